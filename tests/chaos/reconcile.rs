//! Letting the system settle, then checking what happened against what the
//! load was told.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use shop_contracts::Event as _;
use shop_contracts::user::UserDeleted;
use shop_messaging::AmqpConfig;
use shop_messaging::wire::{header_i64, header_str};
use shop_testkit::TestBroker;
use tokio::time::Instant;

use crate::harness::Chaos;
use crate::load::Outcome;

/// Durable queues that record everything published during the run: one per
/// exchange, and a sample the duplicates fault takes from.
pub struct Taps {
    pub user: String,
    pub order: String,
    pub sample: String,
    amqp: AmqpConfig,
}

async fn channel(amqp: &AmqpConfig) -> (lapin::Connection, lapin::Channel) {
    let connection = shop_messaging::connection::connect(amqp, "chaos taps")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

impl Taps {
    pub async fn declare(
        broker: &TestBroker,
        amqp: &AmqpConfig,
        user_exchange: &str,
        order_exchange: &str,
    ) -> Self {
        let taps = Self {
            user: broker.queue("tap.user-events"),
            order: broker.queue("tap.order-events"),
            sample: broker.queue("tap.sample"),
            amqp: amqp.clone(),
        };
        let (connection, channel) = channel(amqp).await;
        for (queue, exchange) in [
            (&taps.user, user_exchange),
            (&taps.order, order_exchange),
            (&taps.sample, user_exchange),
        ] {
            shop_messaging::topology::declare_event_exchange(&channel, exchange)
                .await
                .unwrap();
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await
                .unwrap();
            channel
                .queue_bind(
                    queue.as_str().into(),
                    exchange.into(),
                    "#".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        }
        let _ = connection.close(200, "taps declared".into()).await;
        taps
    }

    /// Everything in `queue`, in delivery order, until it is quiet for a
    /// second.
    async fn drain(&self, queue: &str) -> Vec<Seen> {
        let (connection, channel) = channel(&self.amqp).await;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "drain".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut seen = Vec::new();
        while let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_secs(1), consumer.next()).await
        {
            let headers = delivery.properties.headers().clone().unwrap_or_default();
            seen.push(Seen {
                id: delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.to_string())
                    .unwrap_or_default(),
                aggregate: header_str(&headers, "aggregate_id")
                    .unwrap_or_default()
                    .to_owned(),
                version: header_i64(&headers, "aggregate_version").unwrap_or(0),
            });
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        let _ = connection.close(200, "drained".into()).await;
        seen
    }
}

/// One message as a tap saw it.
struct Seen {
    id: String,
    aggregate: String,
    version: i64,
}

/// Messages seen again, and aggregates whose new events arrived out of
/// version order (repeats of an event already seen are not counted: they
/// are the at-least-once duplicates the inbox absorbs).
fn wire_order(seen: &[Seen]) -> (usize, usize) {
    let mut ids = HashSet::new();
    let mut last: HashMap<&str, i64> = HashMap::new();
    let (mut duplicates, mut violations) = (0, 0);
    for event in seen {
        if !ids.insert(event.id.as_str()) {
            duplicates += 1;
            continue;
        }
        let previous = last.insert(event.aggregate.as_str(), event.version).unwrap_or(0);
        if event.version <= previous {
            violations += 1;
        }
    }
    (duplicates, violations)
}

/// The figures of a run, and what went wrong.
pub struct Report {
    lines: Vec<(String, String)>,
    problems: Vec<String>,
}

impl Report {
    pub fn assert_clean(&self) {
        println!("\n=== chaos run ===");
        for (name, value) in &self.lines {
            println!("{name:<44} {value}");
        }
        assert!(
            self.problems.is_empty(),
            "problems:\n{}",
            self.problems.join("\n")
        );
    }
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// The first column of every row of `sql`, as text.
async fn texts<C: FromIterator<String>>(
    client: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> C {
    client
        .query(sql, params)
        .await
        .unwrap()
        .into_iter()
        .map(|row| row.get(0))
        .collect()
}

/// The projection the user service's events call for: per user, the version
/// of its last event and whether that event deleted it (the projection
/// keeps nothing else of a user).
async fn expected_projection(users: &tokio_postgres::Client) -> HashMap<String, (i64, bool)> {
    let rows = users
        .query(
            "SELECT DISTINCT ON (aggregate_id) aggregate_id, aggregate_version, event_type \
             FROM outbox ORDER BY aggregate_id, aggregate_version DESC",
            &[],
        )
        .await
        .unwrap();
    rows.into_iter()
        .map(|row| {
            let id: String = row.get(0);
            let version: i64 = row.get(1);
            let kind: String = row.get(2);
            (id, (version, kind == UserDeleted::TYPE_NAME))
        })
        .collect()
}

async fn projection_mismatches(
    users: &tokio_postgres::Client,
    orders: &tokio_postgres::Client,
) -> Vec<String> {
    let expected = expected_projection(users).await;
    let actual: HashMap<String, (i64, bool)> = orders
        .query("SELECT user_id::text, version, deleted FROM known_users", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect();
    let mut mismatches = Vec::new();
    for (id, state) in &expected {
        if actual.get(id) != Some(state) {
            mismatches.push(format!(
                "user {id}: expected (version, deleted) {state:?}, projection has {:?}",
                actual.get(id)
            ));
        }
    }
    for id in actual.keys().filter(|id| !expected.contains_key(*id)) {
        mismatches.push(format!("user {id} is in the projection but has no event"));
    }
    mismatches
}

/// Waits for the system to settle (nothing left to publish or consume, the
/// projection caught up), then checks everything.
pub async fn settle_and_reconcile(
    chaos: &Chaos,
    outcome: Outcome,
    elapsed: Duration,
    idle_memory: Vec<(String, u64)>,
    loaded_memory: Vec<(String, u64)>,
) -> Report {
    let users = connect(chaos.user_db.url()).await;
    let orders = connect(chaos.order_db.url()).await;
    let settle_started = Instant::now();
    let settled = loop {
        let unpublished = count(&users, "SELECT count(*) FROM outbox WHERE published_at IS NULL").await
            + count(&orders, "SELECT count(*) FROM outbox WHERE published_at IS NULL").await;
        // Every user event handed to the handler (the consumer's ledger), and
        // the projection caught up.
        let published = count(&users, "SELECT count(*) FROM outbox").await;
        let consumed: i64 = orders
            .query_one(
                "SELECT count(DISTINCT event_id) FROM inbox_ledger WHERE consumer = $1",
                &[&chaos.consumer_queue],
            )
            .await
            .unwrap()
            .get(0);
        if unpublished == 0
            && consumed >= published
            && projection_mismatches(&users, &orders).await.is_empty()
        {
            break true;
        }
        if settle_started.elapsed() > Duration::from_secs(180) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let settle_time = settle_started.elapsed();
    let mut problems = Vec::new();
    if !settled {
        problems.push("the system did not settle within 180 s".to_owned());
    }

    // Publication and consumption.
    let unpublished_users = count(&users, "SELECT count(*) FROM outbox WHERE published_at IS NULL").await;
    let unpublished_orders = count(&orders, "SELECT count(*) FROM outbox WHERE published_at IS NULL").await;
    let user_events: Vec<String> = texts(&users, "SELECT event_id::text FROM outbox", &[]).await;
    let inbox: HashSet<String> = texts(
        &orders,
        "SELECT DISTINCT event_id::text FROM inbox_ledger WHERE consumer = $1",
        &[&chaos.consumer_queue],
    )
    .await;
    let lost = user_events.iter().filter(|id| !inbox.contains(*id)).count();
    let mismatches = projection_mismatches(&users, &orders).await;

    // Every acknowledged command: exactly one event (one effect) each.
    let mut effects: HashMap<(String, i64), i64> = HashMap::new();
    for row in users
        .query("SELECT aggregate_id, aggregate_version FROM outbox", &[])
        .await
        .unwrap()
    {
        *effects.entry((row.get(0), row.get(1))).or_default() += 1;
    }
    let missing_effects = outcome
        .user_effects
        .iter()
        .filter(|key| !effects.contains_key(*key))
        .count();
    let written_twice = effects.values().filter(|n| **n > 1).count();

    // What the handlers saw, from the consumer's ledger (every application,
    // in order): each event once, each user's versions 1, 2, 3, … in order.
    let mut applications: HashMap<String, i64> = HashMap::new();
    let mut seen_by_user: HashMap<String, Vec<i64>> = HashMap::new();
    for row in orders
        .query(
            "SELECT event_id::text, aggregate_id, aggregate_version FROM inbox_ledger \
             WHERE consumer = $1 ORDER BY seq",
            &[&chaos.consumer_queue],
        )
        .await
        .unwrap()
    {
        *applications.entry(row.get(0)).or_default() += 1;
        if let (Some(user), Some(version)) = (row.get::<_, Option<String>>(1), row.get::<_, Option<i64>>(2)) {
            seen_by_user.entry(user).or_default().push(version);
        }
    }
    let applied_twice = applications.values().filter(|n| **n > 1).count();
    let handler_order_violations = seen_by_user
        .values()
        .filter(|versions| **versions != (1..=versions.len() as i64).collect::<Vec<_>>())
        .count();
    let order_ids: HashSet<String> = texts(&orders, "SELECT id::text FROM orders", &[]).await;
    let missing_orders = outcome
        .orders
        .iter()
        .filter(|id| !order_ids.contains(*id))
        .count();
    let extra_orders = order_ids.len().saturating_sub(outcome.orders.len());
    let cancelled: HashSet<String> = texts(
        &orders,
        "SELECT id::text FROM orders WHERE status = 'CANCELLED'",
        &[],
    )
    .await;
    let missing_cancels = outcome
        .cancelled
        .iter()
        .filter(|id| !cancelled.contains(*id))
        .count();

    // The wire.
    let user_wire = chaos.taps.drain(&chaos.taps.user).await;
    let order_wire = chaos.taps.drain(&chaos.taps.order).await;
    let (user_duplicates, user_violations) = wire_order(&user_wire);
    let (order_duplicates, order_violations) = wire_order(&order_wire);
    let seen_orders: HashSet<&str> = order_wire.iter().map(|s| s.id.as_str()).collect();
    // The user-event tap saw every event of the user outbox: the wire's
    // order check is then about all of them, not whatever reached the tap.
    let seen_users: HashSet<&str> = user_wire.iter().map(|s| s.id.as_str()).collect();
    let unseen_user_events = user_events
        .iter()
        .filter(|id| !seen_users.contains(id.as_str()))
        .count();
    let order_events: Vec<String> = texts(&orders, "SELECT event_id::text FROM outbox", &[]).await;
    let lost_order_events = order_events
        .iter()
        .filter(|id| !seen_orders.contains(id.as_str()))
        .count();
    let dead_letters = {
        let dlq = shop_messaging::dlq::DeadLetters::connect(&chaos.amqp, &chaos.consumer_queue)
            .await
            .unwrap();
        let letters = dlq.browse().await.unwrap();
        dlq.close().await;
        letters
    };

    if lost > 0 {
        let missing: Vec<&String> = user_events.iter().filter(|id| !inbox.contains(*id)).collect();
        let detail = users
            .query(
                "SELECT event_id::text, event_type, aggregate_id, aggregate_version, created_at::text, published_at::text \
                 FROM outbox WHERE event_id::text = ANY($1)",
                &[&missing],
            )
            .await
            .unwrap()
            .into_iter()
            .map(|r| {
                let (id, kind, aggregate, version, created, published): (String, String, String, i64, String, Option<String>) =
                    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
                format!("{id} {kind} {aggregate} v{version} created {created} published {published:?}")
            })
            .collect::<Vec<_>>();
        let mut queues = Vec::new();
        let args = [
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ];
        let output = match &chaos.cluster {
            Some(cluster) => cluster.rabbitmqctl(1, &args).await.unwrap_or_default(),
            None => {
                let output = tokio::process::Command::new("rabbitmqctl")
                    .args(args)
                    .output()
                    .await
                    .unwrap();
                String::from_utf8_lossy(&output.stdout).into_owned()
            }
        };
        for line in output.lines() {
            if line.starts_with(chaos.consumer_queue.as_str()) {
                queues.push(line.to_owned());
            }
        }
        problems.push(format!(
            "{lost} user events never applied by the order service:\n  {}\n  queues: {queues:?}",
            detail.join("\n  ")
        ));
    }
    let mut check = |ok: bool, problem: String| {
        if !ok {
            problems.push(problem);
        }
    };
    check(
        unpublished_users + unpublished_orders == 0,
        format!("{unpublished_users} user and {unpublished_orders} order events unpublished"),
    );
    check(
        mismatches.is_empty(),
        format!(
            "projection differs from the source:\n  {}",
            mismatches.join("\n  ")
        ),
    );
    check(
        missing_effects == 0,
        format!("{missing_effects} acknowledged user commands without their event"),
    );
    check(
        written_twice == 0,
        format!("{written_twice} user versions written twice to the outbox"),
    );
    check(
        applied_twice == 0,
        format!("{applied_twice} user events handed to the handler twice (consumer ledger)"),
    );
    check(
        handler_order_violations == 0,
        format!("{handler_order_violations} users whose events the handler saw out of order or with a gap"),
    );
    check(
        missing_orders == 0,
        format!("{missing_orders} acknowledged orders missing"),
    );
    check(
        extra_orders as u64 <= outcome.unknown_order_creates,
        format!(
            "{extra_orders} orders beyond the acknowledged ones, {} of unknown outcome",
            outcome.unknown_order_creates
        ),
    );
    check(
        missing_cancels == 0,
        format!("{missing_cancels} acknowledged cancellations not applied"),
    );
    check(
        lost_order_events == 0,
        format!("{lost_order_events} order events never published"),
    );
    let internal = outcome.failed_by_code.get("Internal").copied().unwrap_or(0);
    check(
        internal == 0,
        format!("{internal} commands answered INTERNAL: an outage must answer UNAVAILABLE"),
    );
    check(
        unseen_user_events == 0 && !user_wire.is_empty(),
        format!(
            "{unseen_user_events} of {} user events never seen on the wire (the tap saw {})",
            user_events.len(),
            user_wire.len()
        ),
    );
    check(
        user_violations + order_violations == 0,
        format!("{user_violations} user and {order_violations} order events out of order on the wire"),
    );
    check(
        dead_letters.is_empty(),
        format!(
            "{} dead letters: {:?}",
            dead_letters.len(),
            dead_letters
                .iter()
                .map(|l| (&l.reason, &l.error))
                .collect::<Vec<_>>()
        ),
    );

    // What the harness saw each fault do (and any fault that did not
    // happen, or after which no command was acknowledged).
    problems.extend(chaos.fault_problems.iter().cloned());

    let faults: Vec<String> = chaos
        .faults_injected
        .iter()
        .map(|(f, d, recovered)| match recovered {
            Some(recovered) => format!("{f:?} ({d:.1?}, moving again {recovered:.1?} after)"),
            None => format!("{f:?} ({d:.1?}, no event within a minute after)"),
        })
        .collect();
    let mib = |m: &[(String, u64)]| {
        m.iter()
            .map(|(n, b)| format!("{n} {:.1} MiB", *b as f64 / 1_048_576.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let load_secs = elapsed.as_secs_f64().max(1.0);
    let mut lines = vec![
        (
            "duration (load), settle".to_owned(),
            format!("{elapsed:.1?}, {settle_time:.1?}"),
        ),
        (
            "broker".to_owned(),
            match &chaos.cluster {
                Some(cluster) => format!("a cluster of {} nodes", cluster.len()),
                None => "one node, behind a proxy".to_owned(),
            },
        ),
        (
            "throughput over the load".to_owned(),
            format!(
                "{:.1} commands/s acknowledged, {:.1} user events/s applied (offered: {} commands/s)",
                outcome.acknowledged as f64 / load_secs,
                inbox.len() as f64 / load_secs,
                chaos.options.rate
            ),
        ),
        (
            "instances per service".to_owned(),
            chaos.user_nodes.len().to_string(),
        ),
        (
            "commands sent / acknowledged / refused / failed".to_owned(),
            format!(
                "{} / {} / {} / {}",
                outcome.sent, outcome.acknowledged, outcome.refused, outcome.failed
            ),
        ),
        (
            "failed commands by code (no client retries)".to_owned(),
            format!("{:?}", outcome.failed_by_code),
        ),
        (
            "failed commands in each fault's window".to_owned(),
            chaos.failures_by_fault.join("; "),
        ),
        (format!("faults injected ({})", faults.len()), faults.join(", ")),
        (
            "failover, from the moment a node went".to_owned(),
            chaos
                .outages
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        ),
        (
            "user events published (distinct)".to_owned(),
            user_events.len().to_string(),
        ),
        (
            "order events published (distinct)".to_owned(),
            order_events.len().to_string(),
        ),
        (
            "deliveries on the wire (user, order)".to_owned(),
            format!("{}, {}", user_wire.len(), order_wire.len()),
        ),
        (
            "duplicates on the wire (user, order)".to_owned(),
            format!("{user_duplicates}, {order_duplicates}"),
        ),
        (
            "events applied (distinct, consumer ledger)".to_owned(),
            inbox.len().to_string(),
        ),
        (
            "lost".to_owned(),
            (lost + lost_order_events + missing_effects + missing_orders).to_string(),
        ),
        (
            "applied twice (consumer ledger; outbox)".to_owned(),
            format!("{applied_twice}; {written_twice}"),
        ),
        (
            "handler order violations (users)".to_owned(),
            handler_order_violations.to_string(),
        ),
        ("projection mismatches".to_owned(), mismatches.len().to_string()),
        (
            "per-aggregate order violations on the wire".to_owned(),
            (user_violations + order_violations).to_string(),
        ),
        ("dead letters".to_owned(), dead_letters.len().to_string()),
        ("what the faults did".to_owned(), chaos.evidence.join("; ")),
        ("resident memory at start".to_owned(), mib(&idle_memory)),
        (
            "resident memory at the end of the load".to_owned(),
            mib(&loaded_memory),
        ),
    ];
    lines.retain(|(_, value)| !value.is_empty());
    Report { lines, problems }
}
