//! The stages of a run, each measured beside its raw limit.

mod consumer;
mod cpu_bound;
mod create_user;
mod end_to_end;
mod latency;
mod ordered;
mod relay;
mod replicas;
mod signing;
mod steady;

pub(crate) use cpu_bound::raw_topology;
pub(crate) use create_user::SERVICE_POOL;

use std::time::Duration;

use prost::Message as _;

use crate::Options;
use crate::env::Bench;
use crate::report::Report;

/// The queues the raw measurements use (for clean-up).
pub(crate) fn raw_queues(bench: &Bench) -> Vec<String> {
    ["raw-publish", "raw-roundtrip"]
        .iter()
        .map(|name| format!("{}.{name}", bench.consumer_queue))
        .collect()
}

pub(crate) async fn run_all(bench: &Bench, options: &Options, report: &mut Report) -> anyhow::Result<()> {
    println!(
        "{:<52} {:<48} {:<44} ratio",
        "figure", "measured", "raw limit (same run)"
    );
    let wanted = |stage: &str| options.stages.iter().any(|s| s == stage);
    if wanted("create-user") {
        create_user::run(bench, options, report).await?;
    }
    let mut slowest = f64::INFINITY;
    if wanted("relay") {
        slowest = slowest.min(relay::run(bench, options, report).await?);
        if wanted("consumer") {
            slowest = slowest.min(consumer::run(bench, options, report).await?);
        }
    }
    if wanted("ordered") {
        ordered::run(bench, options, report).await?;
    }
    if wanted("end-to-end") {
        end_to_end::run(bench, options, report, slowest).await?;
    }
    if wanted("latency") {
        latency::run(bench, options, report).await?;
    }
    let mut sustained = None;
    if wanted("steady") {
        sustained = steady::run(bench, options, report).await?;
    }
    // After the steady state: its batch sizes and CPU per event are what
    // the raw stages are measured at and compared with.
    if wanted("cpu-bound") {
        cpu_bound::run(bench, options, report, sustained.as_ref()).await?;
    }
    if wanted("replicas") {
        replicas::run(bench, options, report).await?;
    }
    // Last: it puts the signature's cost beside the relay's and the steady
    // state's figures of the same run.
    if wanted("signing") {
        signing::run(bench, options, report).await?;
    }
    Ok(())
}

/// The body of a `UserCreated`, as the user service encodes it.
pub(crate) fn user_created_body(user_id: &str) -> Vec<u8> {
    user_created(user_id).encode_to_vec()
}

/// A `UserCreated` of a new user.
fn user_created(user_id: &str) -> shop_contracts::user::UserCreated {
    shop_contracts::user::UserCreated {
        user_id: user_id.to_owned(),
        version: 1,
        email: format!("{user_id}@example.com"),
        name: "Bench User".to_owned(),
        occurred_at: Some(shop_contracts::prost_types::Timestamp::from(
            std::time::SystemTime::now(),
        )),
    }
}

/// Fills the user service's outbox with `count` unpublished `UserCreated`
/// rows of distinct users, as if that many commands had committed: through
/// the production `enqueue` (and so its partition function), pipelined in
/// transactions of 2,000.
pub(crate) async fn prefill_outbox(bench: &Bench, count: usize) -> anyhow::Result<()> {
    use diesel_async::AsyncConnection as _;

    let mut conn = bench.user_pool.get().await?;
    let events: Vec<shop_contracts::user::UserCreated> = (0..count)
        .map(|_| {
            let id = uuid::Uuid::now_v7().to_string();
            user_created(&id)
        })
        .collect();
    for chunk in events.chunks(2000) {
        conn.transaction(async |conn| {
            let conn: &diesel_async::AsyncPgConnection = conn;
            futures::future::try_join_all(chunk.iter().map(|event| shop_outbox::enqueue(conn, event))).await
        })
        .await?;
    }
    Ok(())
}

/// How long to wait before counting again: half the time the rest should
/// take at the rate so far, between 2 and 200 ms. Counting a table of tens
/// of thousands of rows costs the database milliseconds of the CPU the
/// measured stage runs on, so the polls thin out while far from the end.
pub(crate) fn next_poll(done: usize, total: usize, elapsed: Duration) -> Duration {
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    let rest = if rate > 0.0 {
        total.saturating_sub(done) as f64 / rate
    } else {
        0.05
    };
    Duration::from_secs_f64(rest / 2.0).clamp(Duration::from_millis(2), Duration::from_millis(200))
}

/// Counts the rows of `table` until there are `count`; returns the time it
/// took from `started`.
pub(crate) async fn wait_for_rows(
    url: &str,
    table: &str,
    count: usize,
    started: tokio::time::Instant,
    limit: Duration,
) -> anyhow::Result<Duration> {
    wait_for_count(
        url,
        &format!("SELECT count(*) FROM {table}"),
        table,
        count,
        started,
        limit,
    )
    .await
}

/// Runs `query` (one `bigint`: how much is done) until it reaches `count`;
/// returns the time it took from `started`. `what` names the count in the
/// error when `limit` passes first.
pub(crate) async fn wait_for_count(
    url: &str,
    query: &str,
    what: &str,
    count: usize,
    started: tokio::time::Instant,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    loop {
        let rows: i64 = client.query_one(query, &[]).await?.get(0);
        let rows = usize::try_from(rows).unwrap_or(0);
        if rows >= count {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < limit,
            "only {rows} of {count} {what} after {limit:?}"
        );
        tokio::time::sleep(next_poll(rows, count, started.elapsed())).await;
    }
}
