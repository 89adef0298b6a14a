//! CreateUser over gRPC against the same two INSERTs in one transaction
//! issued directly, at several concurrencies; and resident memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use shop_contracts::user as pb;
use shop_contracts::user::user_service_client::UserServiceClient;
use tokio::time::Instant;

use crate::Options;
use crate::env::{Authentication, Bench};
use crate::report::{Report, Row};
use crate::stats::Sample;

static RUN: AtomicU64 = AtomicU64::new(0);

fn email(task: usize, i: u64) -> String {
    format!("b{}-{task}-{i}@example.com", RUN.load(Ordering::Relaxed))
}

/// CreateUser from `concurrency` tasks until `duration`, the tasks spread
/// evenly over `endpoints` (one channel each).
pub(crate) async fn grpc_load(
    endpoints: &[String],
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Sample> {
    RUN.fetch_add(1, Ordering::Relaxed);
    let mut channels = Vec::new();
    for endpoint in endpoints {
        channels.push(
            tonic::transport::Endpoint::from_shared(endpoint.clone())?
                .connect()
                .await?,
        );
    }
    anyhow::ensure!(!channels.is_empty(), "no endpoint to load");
    let started = Instant::now();
    let until = started + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            // A token on every call, also to a service with GRPC_AUTH=none
            // (which ignores it): the same bytes on the wire either way.
            let mut client =
                UserServiceClient::new(crate::env::with_token(channels[task % channels.len()].clone()));
            tokio::spawn(async move {
                let mut sample = Sample::default();
                let mut i = 0;
                while Instant::now() < until {
                    i += 1;
                    let request = pb::CreateUserRequest {
                        email: email(task, i),
                        name: "Bench User".to_owned(),
                        request_id: String::new(),
                    };
                    let at = Instant::now();
                    match client.create_user(request).await {
                        Ok(_) => sample.latencies.push(at.elapsed()),
                        Err(_) => sample.errors += 1,
                    }
                }
                sample
            })
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.push(task.await?);
    }
    Ok(Sample::merge(samples, started.elapsed()))
}

/// The user service's `DATABASE_POOL_SIZE` in the benchmark.
pub(crate) const SERVICE_POOL: usize = 32;

/// The best the same transaction does from a plain client at `concurrency`:
/// [`raw_load_on`] with each number of connections up to `concurrency`
/// (from 8 on, doubling) and at most [`SERVICE_POOL`], the fastest kept with
/// its connection count. More connections than the server's cores can use
/// contend on locks and WAL, so the most connections is not the limit; and
/// the raw side gets no more connections than the service's pool.
async fn raw_load(url: &str, concurrency: usize, duration: Duration) -> anyhow::Result<(Sample, usize)> {
    let most = concurrency.min(SERVICE_POOL);
    let mut counts: Vec<usize> = std::iter::successors(Some(8), |n| Some(n * 2))
        .take_while(|n| *n < most)
        .collect();
    counts.push(most);
    let mut best: Option<(Sample, usize)> = None;
    for connections in counts {
        let sample = raw_load_on(url, connections, duration, None).await?;
        if best
            .as_ref()
            .is_none_or(|(fastest, _)| sample.rate() > fastest.rate())
        {
            best = Some((sample, connections));
        }
    }
    best.ok_or_else(|| anyhow::anyhow!("no raw load ran"))
}

/// The same transaction (user row + outbox row) issued directly with
/// tokio-postgres, one task per connection, prepared statements; each
/// preceded by `check` when given (the caller's token checked as the
/// service checks it).
pub(crate) async fn raw_load_on(
    url: &str,
    concurrency: usize,
    duration: Duration,
    check: Option<Arc<super::cpu_bound::TokenCheck>>,
) -> anyhow::Result<Sample> {
    RUN.fetch_add(1, Ordering::Relaxed);
    let mut clients = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..concurrency {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        connections.push(tokio::spawn(connection));
        clients.push(client);
    }
    let started = Instant::now();
    let until = started + duration;
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(task, mut client)| {
            let check = check.clone();
            tokio::spawn(async move {
                let insert_user = client
                    .prepare(
                        "INSERT INTO users (id, email, name, version, created_at, updated_at) \
                         VALUES ($1, $2, $3, 1, now(), now())",
                    )
                    .await?;
                let insert_event = client
                    .prepare(
                        "INSERT INTO outbox (event_id, aggregate_type, aggregate_id, aggregate_version, \
                         partition_key, event_type, routing_key, payload, trace_context) \
                         VALUES ($1, 'user', $2, 1, $3, 'shop.user.v1.UserCreated', 'user.created', $4, '{}')",
                    )
                    .await?;
                let mut sample = Sample::default();
                let mut i = 0;
                while Instant::now() < until {
                    i += 1;
                    let id = uuid::Uuid::now_v7();
                    let body = super::user_created_body(&id.to_string());
                    let at = Instant::now();
                    if let Some(check) = &check {
                        check.check()?;
                    }
                    let transaction = client.transaction().await?;
                    transaction
                        .execute(&insert_user, &[&id, &email(task, i), &"Bench User"])
                        .await?;
                    transaction
                        .execute(
                            &insert_event,
                            &[&uuid::Uuid::now_v7(), &id.to_string(), &shop_outbox::partition_of(&id.to_string()), &body],
                        )
                        .await?;
                    transaction.commit().await?;
                    sample.latencies.push(at.elapsed());
                }
                anyhow::Ok(sample)
            })
        })
        .collect();
    let mut samples = Vec::new();
    for task in tasks {
        samples.push(task.await??);
    }
    let elapsed = started.elapsed();
    // The clients are gone with their tasks: wait for the connections to
    // close, so the next run's do not find the server's slots still taken.
    for connection in connections {
        let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
    }
    Ok(Sample::merge(samples, elapsed))
}

/// The highest resident memory of `pid` while `load` runs, sampled every
/// 20 ms.
async fn peak_rss<T>(pids: &[u32], load: impl std::future::Future<Output = T>) -> (T, Vec<u64>) {
    let peaks: Arc<Vec<AtomicU64>> = Arc::new(pids.iter().map(|_| AtomicU64::new(0)).collect());
    let sampler = {
        let peaks = peaks.clone();
        let pids = pids.to_vec();
        tokio::spawn(async move {
            loop {
                for (pid, peak) in pids.iter().zip(peaks.iter()) {
                    peak.fetch_max(rss(*pid).unwrap_or(0), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let output = load.await;
    sampler.abort();
    (output, peaks.iter().map(|p| p.load(Ordering::Relaxed)).collect())
}

/// What authentication costs a call: CreateUser at concurrency 1 and 32 (of
/// those asked for) against a service that verifies bearer tokens and the
/// same service with `GRPC_AUTH=none`, both running, rounds alternating, the
/// median ratio kept.
async fn authentication_cost(bench: &Bench, options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let concurrencies: Vec<usize> = options
        .concurrency
        .iter()
        .copied()
        .filter(|c| *c == 1 || *c == 32)
        .collect();
    if concurrencies.is_empty() {
        return Ok(());
    }
    let mut with = bench.spawn_user_service_with(false, Authentication::Jwt).await?;
    let mut without = bench.spawn_user_service_with(false, Authentication::None).await?;
    let (with_endpoint, without_endpoint) = (
        [format!("http://{}", with.addr)],
        [format!("http://{}", without.addr)],
    );
    for concurrency in concurrencies {
        let mut rounds = Vec::new();
        for _ in 0..options.rounds.max(1) {
            bench.reset_tables().await?;
            let authenticated = grpc_load(&with_endpoint, concurrency, options.duration()).await?;
            bench.reset_tables().await?;
            let open = grpc_load(&without_endpoint, concurrency, options.duration()).await?;
            rounds.push((authenticated, open));
        }
        let (authenticated, open) = crate::stats::median_by_ratio(&rounds, |(authenticated, open)| {
            authenticated.rate() / open.rate()
        })
        .ok_or_else(|| anyhow::anyhow!("no authentication round ran"))?;
        report.add(Row {
            figure: format!("CreateUser with JWT authentication, concurrency {concurrency}"),
            value: authenticated.describe(),
            raw: format!("same service, GRPC_AUTH=none: {}", open.describe()),
            ratio: Some(authenticated.rate() / open.rate()),
            numbers: json!({
                "concurrency": concurrency,
                "rounds": options.rounds,
                "jwt": {"rate": authenticated.rate(), "p50_ms": authenticated.quantile_ms(0.5), "p99_ms": authenticated.quantile_ms(0.99), "errors": authenticated.errors},
                "none": {"rate": open.rate(), "p50_ms": open.quantile_ms(0.5), "p99_ms": open.quantile_ms(0.99), "errors": open.errors},
            }),
        });
    }
    with.terminate().await?;
    without.terminate().await?;
    Ok(())
}

/// Resident memory of a process, in bytes.
pub(crate) fn rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1024.0 / 1024.0)
}

pub(crate) async fn run(bench: &Bench, options: &Options, report: &mut Report) -> anyhow::Result<()> {
    // The command path alone: the relay is off, so the comparison with the
    // raw transaction is like for like.
    let mut users = bench.spawn_user_service(false).await?;
    let endpoint = [format!("http://{}", users.addr)];
    for &concurrency in &options.concurrency {
        let mut rounds = Vec::new();
        for _ in 0..options.rounds.max(1) {
            bench.reset_tables().await?;
            let grpc = grpc_load(&endpoint, concurrency, options.duration()).await?;
            bench.reset_tables().await?;
            let raw = raw_load(&bench.user_db, concurrency, options.duration()).await?;
            report.bound("command transaction", raw.0.rate());
            rounds.push((grpc, raw));
        }
        let (grpc, (raw, connections)) =
            crate::stats::median_by_ratio(&rounds, |(grpc, (raw, _))| grpc.rate() / raw.rate())
                .ok_or_else(|| anyhow::anyhow!("no CreateUser round ran"))?;
        report.add(Row {
            figure: format!("CreateUser over gRPC, concurrency {concurrency}"),
            value: grpc.describe(),
            raw: format!("same tx, tokio-postgres, best of up to {concurrency} connections ({connections}): {}", raw.describe()),
            ratio: Some(grpc.rate() / raw.rate()),
            numbers: json!({
                "concurrency": concurrency,
                "rounds": options.rounds,
                "grpc": {"rate": grpc.rate(), "p50_ms": grpc.quantile_ms(0.5), "p99_ms": grpc.quantile_ms(0.99), "p999_ms": grpc.quantile_ms(0.999), "errors": grpc.errors},
                "raw": {"connections": connections, "rate": raw.rate(), "p50_ms": raw.quantile_ms(0.5), "p99_ms": raw.quantile_ms(0.99), "p999_ms": raw.quantile_ms(0.999)},
            }),
        });
    }
    users.terminate().await?;
    authentication_cost(bench, options, report).await?;

    // The whole system: relay and consumer on, memory of both services.
    bench.reset_tables().await?;
    let mut users = bench.spawn_user_service(true).await?;
    let mut orders = bench.spawn_order_service(options.prefetch).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pids = [users.pid().unwrap_or(0), orders.pid().unwrap_or(0)];
    let idle: Vec<u64> = pids.iter().map(|pid| rss(*pid).unwrap_or(0)).collect();
    let concurrency = 32.min(options.concurrency.iter().copied().max().unwrap_or(32));
    let endpoint = [format!("http://{}", users.addr)];
    let (load, peaks) = peak_rss(&pids, grpc_load(&endpoint, concurrency, options.duration())).await;
    let load = load?;
    report.add(Row {
        figure: format!("CreateUser, concurrency {concurrency}, whole system running"),
        value: load.describe(),
        raw: "(relay and consumer on, same 2 cores)".to_owned(),
        ratio: None,
        numbers: json!({"rate": load.rate(), "p50_ms": load.quantile_ms(0.5), "p99_ms": load.quantile_ms(0.99)}),
    });
    for (index, service) in ["user-service", "order-service"].iter().enumerate() {
        report.add(Row {
            figure: format!("resident memory, {service}"),
            value: format!("idle {}, under load {}", mib(idle[index]), mib(peaks[index])),
            raw: "—".to_owned(),
            ratio: None,
            numbers: json!({"idle_bytes": idle[index], "load_bytes": peaks[index]}),
        });
    }
    users.terminate().await?;
    orders.terminate().await?;
    Ok(())
}
