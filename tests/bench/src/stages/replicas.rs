//! What a second instance buys on this machine: CreateUser through one user
//! service process against two, and the outbox drained by one relay and
//! consumer against two, on the same database and broker. The "raw limit"
//! column is the single instance, so the ratio is the scale-out factor.

use serde_json::json;

use super::create_user::grpc_load;
use super::end_to_end::drain;
use crate::Options;
use crate::env::Bench;
use crate::report::{Report, Row};
use crate::stats::median_by_ratio;

/// The median of `rounds` pairs `(two, one)` by their ratio.
fn median(rounds: &[(f64, f64)]) -> anyhow::Result<(f64, f64)> {
    median_by_ratio(rounds, |(two, one)| two / one).ok_or_else(|| anyhow::anyhow!("no round ran"))
}

pub(crate) async fn run(bench: &Bench, options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let concurrency = 32.min(options.concurrency.iter().copied().max().unwrap_or(32));
    let mut first = bench.spawn_user_service(false).await?;
    let mut second = bench.spawn_user_service(false).await?;
    let one = [format!("http://{}", first.addr)];
    let two = [one[0].clone(), format!("http://{}", second.addr)];
    let mut rounds = Vec::new();
    for _ in 0..options.rounds.max(1) {
        bench.reset_tables().await?;
        let single = grpc_load(&one, concurrency, options.duration()).await?;
        bench.reset_tables().await?;
        let double = grpc_load(&two, concurrency, options.duration()).await?;
        rounds.push((double.rate(), single.rate()));
    }
    first.terminate().await?;
    second.terminate().await?;
    let (double, single) = median(&rounds)?;
    report.add(Row {
        figure: format!("CreateUser, concurrency {concurrency}, two user service instances"),
        value: format!("{double:.0}/s"),
        raw: format!("one instance: {single:.0}/s"),
        ratio: Some(double / single),
        numbers: json!({"concurrency": concurrency, "two": double, "one": single, "rounds": rounds}),
    });

    let mut rounds = Vec::new();
    for _ in 0..options.rounds.max(1) {
        let single = drain(bench, options, 1).await?;
        let double = drain(bench, options, 2).await?;
        rounds.push((double, single));
    }
    let (double, single) = median(&rounds)?;
    report.add(Row {
        figure: format!(
            "end to end: {} outbox rows, two relays + two consumers",
            options.events
        ),
        value: format!("{double:.0} events/s"),
        raw: format!("one of each: {single:.0}/s"),
        ratio: Some(double / single),
        numbers: json!({"events": options.events, "two": double, "one": single, "rounds": rounds}),
    });
    Ok(())
}
