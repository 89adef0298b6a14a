//! End-to-end latency: CreateUser returned → the user's row visible in the
//! order service's projection, at a steady rate; against the raw publish →
//! confirm → deliver round trip.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
/// (the benchmark's own, on its own database).
async fn watch_projection(bench: &Bench) -> anyhow::Result<Arc<Mutex<HashMap<String, Instant>>>> {
    let (client, mut connection) = tokio_postgres::connect(&bench.order_db, tokio_postgres::NoTls).await?;
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let recorder = seen.clone();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(notification) = message {
                recorder
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(notification.payload().to_owned(), Instant::now());
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

async fn measure(
    endpoint: &str,
    seen: &Arc<Mutex<HashMap<String, Instant>>>,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<Sample> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
        .connect()
        .await?;
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
            Some((user.id, Instant::now()))
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
    for (id, at) in returned {
        loop {
            let visible = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&id)
                .copied();
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
    Ok(sample)
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
        let sample = measure(&endpoint, &seen, rate, Duration::from_secs(options.latency_secs)).await?;
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
    }
    users.terminate().await?;
    orders.terminate().await?;
    Ok(())
}
