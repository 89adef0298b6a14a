//! The whole pipeline at steady state: CreateUser at a fixed offered rate
//! with the relay and the consumer running, stepped up until they no longer
//! keep up, with the CPU every process spent per event.
//!
//! A step keeps up when at least 95 % of the offered commands succeed and,
//! at its end, what is not yet through (outbox rows not published plus
//! users created but not in the projection) is under half a second of the
//! offered rate. The CPU of each process (both services, PostgreSQL's
//! postmaster and backends, the RabbitMQ node, this load generator) comes
//! from `/proc/<pid>/stat`, divided by the commands of the step.
//!
//! The bound beside it is the sum of the raw per-event costs measured in the
//! same run, each the inverse of a raw rate that saturates the machine: the
//! command transaction (the create-user stage's best plain-client rate),
//! the confirmed publish (relay stage), consume + ack (consumer stage) and
//! the projection transaction (measured here, batches of 100 as the
//! consumer applies them). Running all four one after the other at their
//! raw rates, the machine could carry `1 / Σ (1 / rate)` events a second.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use shop_contracts::user as pb;
use shop_contracts::user::user_service_client::UserServiceClient;
use tokio::time::Instant;

use crate::Options;
use crate::env::Bench;
use crate::report::{Report, Row};

/// How much one step may leave behind, in seconds of its offered rate.
const BACKLOG_SECONDS: f64 = 0.5;
/// Rate steps: each the one before times this.
const STEP: f64 = 1.4;
/// Steps at most.
const MAX_STEPS: usize = 12;
/// Calls in flight at most before the load generator counts itself behind.
const MAX_IN_FLIGHT: usize = 512;

/// The CPU time of a process, in clock ticks: its own, and its waited-for
/// children's.
fn ticks(pid: u32) -> Option<(u64, u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields are counted
    // after its closing parenthesis (field 3 is then the first).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let number = |field: usize| fields.get(field - 3)?.parse::<u64>().ok();
    let ppid = u32::try_from(number(4)?).ok()?;
    Some((number(14)? + number(15)?, number(16)? + number(17)?, ppid))
}

/// Clock ticks a second (`getconf CLK_TCK`; 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// The CPU of `pid`, its live children and its exited children, in ticks,
/// leaving out the children in `apart` (counted under their own names: the
/// services are children of the load generator's process).
fn tree_ticks(pid: u32, apart: &[u32]) -> u64 {
    let Some((own, exited, _)) = ticks(pid) else {
        return 0;
    };
    let children: u64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| !apart.contains(child))
        .filter_map(ticks)
        .filter(|(_, _, ppid)| *ppid == pid)
        .map(|(cpu, _, _)| cpu)
        .sum();
    own + exited + children
}

/// The process listening on TCP `port` (from `/proc/net/tcp*` and the
/// processes' descriptors).
fn listener(port: u16) -> Option<u32> {
    let port = format!(":{port:04X}");
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(table).ok())
        .flat_map(|table| table.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let listening = fields.get(3) == Some(&"0A");
            (listening && fields.get(1)?.ends_with(&port))
                .then(|| fields.get(9).map(|inode| (*inode).to_owned()))?
        })?;
    let socket = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|target| target.to_string_lossy() == socket)
                })
        })
}

/// The port of a URL (`scheme://…host:port/…`), or `default`.
fn port_of(url: &str, default: u16) -> u16 {
    url.split_once("://")
        .map(|(_, rest)| rest.split('/').next().unwrap_or_default())
        .and_then(|authority| authority.rsplit('@').next())
        .and_then(|host| host.rsplit_once(':'))
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(default)
}

/// The processes whose CPU a step counts, by name.
struct Processes(Vec<(&'static str, u32)>);

impl Processes {
    fn cpu(&self) -> BTreeMap<&'static str, u64> {
        let pids: Vec<u32> = self.0.iter().map(|(_, pid)| *pid).collect();
        self.0
            .iter()
            .map(|(name, pid)| (*name, tree_ticks(*pid, &pids)))
            .collect()
    }
}

/// What one step measured.
struct Step {
    offered: f64,
    succeeded: usize,
    elapsed: Duration,
    backlog: i64,
    cpu_us_per_event: BTreeMap<&'static str, f64>,
}

impl Step {
    fn rate(&self) -> f64 {
        self.succeeded as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn kept_up(&self) -> bool {
        self.rate() >= 0.95 * self.offered && (self.backlog as f64) < BACKLOG_SECONDS * self.offered
    }

    fn total_us(&self) -> f64 {
        self.cpu_us_per_event.values().sum()
    }
}

/// Offers CreateUser at `rate` a second for `duration`; returns the calls
/// that succeeded and the time taken.
async fn offer(endpoint: &str, rate: f64, duration: Duration) -> anyhow::Result<(usize, Duration)> {
    let channel = crate::env::with_token(
        tonic::transport::Endpoint::from_shared(endpoint.to_owned())?
            .connect()
            .await?,
    );
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut succeeded = 0;
    let mut sent = 0_u64;
    while started.elapsed() < duration {
        // The calls due by now at the offered rate, whatever the timer's
        // granularity.
        let due = (started.elapsed().as_secs_f64() * rate) as u64;
        while sent < due && calls.len() < MAX_IN_FLIGHT {
            sent += 1;
            let mut client = UserServiceClient::new(channel.clone());
            calls.spawn(async move {
                let request = pb::CreateUserRequest {
                    email: format!("steady-{}@example.com", uuid::Uuid::new_v4().simple()),
                    name: "Steady".to_owned(),
                    request_id: String::new(),
                };
                client.create_user(request).await.is_ok()
            });
        }
        while let Some(done) = calls.try_join_next() {
            succeeded += usize::from(done.unwrap_or(false));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    while let Some(done) = calls.join_next().await {
        succeeded += usize::from(done.unwrap_or(false));
    }
    Ok((succeeded, started.elapsed()))
}

/// Outbox rows not yet published plus users not yet in the projection.
async fn backlog(bench: &Bench, created: usize) -> anyhow::Result<i64> {
    let count = async |url: &str, query: &str| -> anyhow::Result<i64> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client.query_one(query, &[]).await?.get(0))
    };
    let pending = count(
        &bench.user_db,
        "SELECT count(*) FROM outbox WHERE published_at IS NULL",
    )
    .await?;
    let projected = count(&bench.order_db, "SELECT count(*) FROM known_users").await?;
    Ok(pending + (i64::try_from(created).unwrap_or(i64::MAX) - projected).max(0))
}

/// The projection transaction alone, from a plain client: `count` users
/// upserted in transactions of 100, the consumer's batch. Events/s.
async fn raw_projection(bench: &Bench, count: usize) -> anyhow::Result<f64> {
    let (mut client, connection) = tokio_postgres::connect(&bench.order_db, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let upsert = client
        .prepare(
            "INSERT INTO known_users (user_id, version, deleted) \
             SELECT u.id, 1, false FROM unnest($1::uuid[]) AS u(id) \
             ON CONFLICT (user_id) DO UPDATE SET version = excluded.version \
             WHERE known_users.version < excluded.version",
        )
        .await?;
    let started = Instant::now();
    let mut done = 0;
    while done < count {
        let ids: Vec<uuid::Uuid> = (0..100.min(count - done)).map(|_| uuid::Uuid::now_v7()).collect();
        let transaction = client.transaction().await?;
        transaction.execute(&upsert, &[&ids]).await?;
        transaction.commit().await?;
        done += ids.len();
    }
    let rate = count as f64 / started.elapsed().as_secs_f64().max(1e-9);
    client.batch_execute("TRUNCATE known_users").await?;
    Ok(rate)
}

pub(crate) async fn run(bench: &Bench, options: &Options, report: &mut Report) -> anyhow::Result<()> {
    bench.reset_tables().await?;
    let projection_rate = raw_projection(bench, options.events.min(20_000)).await?;
    report.bound("projection transaction", projection_rate);

    let mut users = bench.spawn_user_service(true).await?;
    let mut orders = bench.spawn_order_service(options.prefetch).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut processes = vec![
        ("user-service", users.pid().unwrap_or(0)),
        ("order-service", orders.pid().unwrap_or(0)),
        ("load generator", std::process::id()),
    ];
    if let Some(pid) = listener(port_of(&options.database_url, 5432)) {
        processes.push(("postgresql", pid));
    }
    if let Some(pid) = listener(port_of(&options.amqp_url, 5672)) {
        processes.push(("rabbitmq", pid));
    }
    let processes = Processes(processes);
    let endpoint = format!("http://{}", users.addr);
    let duration = Duration::from_secs(options.steady_secs);

    let mut steps: Vec<Step> = Vec::new();
    let mut created = 0;
    let mut rate = options.steady_start;
    for _ in 0..MAX_STEPS {
        let before = processes.cpu();
        let measuring = crate::marker::measuring(&format!("steady {rate:.0}/s"));
        let (succeeded, elapsed) = offer(&endpoint, rate, duration).await?;
        drop(measuring);
        created += succeeded;
        let backlog = backlog(bench, created).await?;
        let after = processes.cpu();
        let per_event = |name: &&'static str| {
            let ticks = after
                .get(name)
                .copied()
                .unwrap_or(0)
                .saturating_sub(before.get(name).copied().unwrap_or(0));
            ticks as f64 / TICKS_PER_SECOND * 1e6 / succeeded.max(1) as f64
        };
        let step = Step {
            offered: rate,
            succeeded,
            elapsed,
            backlog,
            cpu_us_per_event: after.keys().map(|name| (*name, per_event(name))).collect(),
        };
        let kept_up = step.kept_up();
        steps.push(step);
        if !kept_up {
            break;
        }
        // Let what is in flight drain before the next step, so each step
        // starts from an empty pipeline.
        super::wait_for_count(
            &bench.order_db,
            "SELECT count(*) FROM known_users",
            "users projected",
            created,
            Instant::now(),
            Duration::from_secs(60),
        )
        .await?;
        rate *= STEP;
    }
    users.terminate().await?;
    orders.terminate().await?;

    let best = steps.iter().rfind(|step| step.kept_up());
    let bound = report.bound_rate(&[
        "command transaction",
        "confirmed publish",
        "consume + ack",
        "projection transaction",
    ]);
    let (value, cpu) = match best {
        Some(step) => (
            format!("{:.0} commands/s sustained", step.rate()),
            step.cpu_us_per_event
                .iter()
                .map(|(name, us)| format!("{name} {us:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        None => (format!("not even {:.0}/s", options.steady_start), String::new()),
    };
    report.add(Row {
        figure: "steady state: CreateUser, relay and consumer keeping up".to_owned(),
        value,
        raw: match &bound {
            Some((rate, parts)) => format!("bound, Σ raw per-event costs ({parts}): {rate:.0}/s"),
            None => "bound needs the create-user, relay and consumer stages in the same run".to_owned(),
        },
        ratio: best
            .zip(bound.as_ref())
            .map(|(step, (rate, _))| step.rate() / rate),
        numbers: json!({
            "steps": steps.iter().map(|step| json!({
                "offered": step.offered,
                "rate": step.rate(),
                "backlog": step.backlog,
                "kept_up": step.kept_up(),
                "cpu_us_per_event": step.cpu_us_per_event,
                "cpu_us_per_event_total": step.total_us(),
            })).collect::<Vec<_>>(),
        }),
    });
    if let Some(step) = best {
        report.add(Row {
            figure: "steady state: CPU µs per event, by process".to_owned(),
            value: format!("{:.0} µs in all", step.total_us()),
            raw: cpu,
            ratio: None,
            numbers: json!(step.cpu_us_per_event),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::port_of;

    #[test]
    fn ports_come_from_the_url_or_the_default() {
        assert_eq!(
            port_of("postgres://postgres:postgres@localhost:5433/postgres", 5432),
            5433
        );
        assert_eq!(port_of("postgres://localhost/postgres", 5432), 5432);
        assert_eq!(port_of("amqp://guest:guest@localhost:5672/%2f", 1), 5672);
    }
}
