//! What the run checks from outside the services: the load it achieved
//! outside the faults and the codes each fault caused, and the overlapping
//! read-only order database and broker alarm, whose held backlog, blocked
//! publishes and uncharged attempts are read from the broker, the databases
//! and the services' metrics, not from what the harness meant to do.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::harness::{Chaos, Fault, MemoryAlarm};
use crate::load::{Answer, Load, Outcome};

/// The share of the nominal command rate the load must reach outside the
/// fault windows: below it, the faults were not tried under the load the
/// run claims.
const NOMINAL_SHARE: f64 = 0.8;

impl Chaos {
    /// The codes each fault's window saw, and the rate answered outside
    /// every window against the nominal rate.
    pub(crate) fn judge_the_load(&mut self, outcome: &Outcome, started: Instant, stopped: Instant) {
        let windows = self.fault_windows.clone();
        let in_a_window = |at: Instant| windows.iter().any(|(_, from, to)| at >= *from && at <= *to);
        for (fault, from, to) in &windows {
            let mut codes: BTreeMap<&str, u64> = BTreeMap::new();
            for (at, answer) in &outcome.answers {
                if let Answer::Failed(code) = answer
                    && at >= from
                    && at <= to
                {
                    *codes.entry(code.as_str()).or_default() += 1;
                }
            }
            self.failures_by_fault.push(format!("{fault:?} {codes:?}"));
        }
        let mut between: BTreeMap<&str, u64> = BTreeMap::new();
        let mut answered = 0_u64;
        for (_, answer) in outcome.answers.iter().filter(|(at, _)| !in_a_window(*at)) {
            match answer {
                Answer::Acknowledged | Answer::Refused => answered += 1,
                Answer::Failed(code) => *between.entry(code.as_str()).or_default() += 1,
            }
        }
        self.failures_by_fault.push(format!("between faults {between:?}"));
        // The union of the windows: a fault's window may reach into the
        // next one's.
        let mut spans: Vec<(Instant, Instant)> = windows
            .iter()
            .map(|(_, from, to)| (*from, (*to).min(stopped)))
            .collect();
        spans.sort();
        let mut covered = Duration::ZERO;
        let mut reached = started;
        for (from, to) in spans {
            let from = from.max(reached);
            if to > from {
                covered += to - from;
                reached = to;
            }
        }
        let total = stopped.saturating_duration_since(started);
        let outside = total.saturating_sub(covered);
        if outside < Duration::from_secs(5) {
            self.fault_problems.push(format!(
                "the fault windows left {outside:.1?} of {total:.1?} without a fault: the load cannot be judged"
            ));
            return;
        }
        let nominal = f64::from(self.options.rate);
        let rate = answered as f64 / outside.as_secs_f64();
        self.evidence.push(format!(
            "load: {rate:.1} commands/s answered outside the fault windows ({outside:.0?} of {total:.0?}), nominal {nominal}"
        ));
        if rate < NOMINAL_SHARE * nominal {
            self.fault_problems.push(format!(
                "the load reached {rate:.1} commands/s outside the faults, under {:.0} % of the nominal {nominal}",
                NOMINAL_SHARE * 100.0
            ));
        }
    }

    /// [`Fault::ReadOnlyOrderDatabase`].
    pub(crate) async fn read_only_order_database_under_alarm(&mut self, fault: Fault, load: &Load) {
        let charged_before = self.consumer_charges().await;
        let acknowledged = load.acknowledged();
        let held = self.retry_budget + Duration::from_secs(2);
        let lift_at = Instant::now() + held;
        self.order_db.set_read_only(true).await.unwrap();
        // Events pile up in the consumer's queues; then copies of some of
        // them, not applied yet, and of applied ones.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let replay = load.replay_sample(&self.order_db).await;
        self.expect(
            fault,
            replay.unapplied > 0 && replay.applied > 0,
            format!(
                "{} events replayed while the consumer was held: {} not applied yet, {} applied",
                replay.replayed, replay.unapplied, replay.applied
            ),
        );
        let alarm = MemoryAlarm::raise().await;
        // The alarm in force: the broker lists a connection it blocks (one
        // that tried to publish), or two seconds passed.
        let raised = Instant::now();
        let mut broker_blocked = 0;
        while broker_blocked == 0 && raised.elapsed() < Duration::from_secs(2) {
            broker_blocked = blocked_connections().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let blocked_from = chrono::Utc::now();
        let tapped_before = self.tapped().await;
        // Until a second before the database comes back: what the broker
        // and the user relay say of the publishes.
        let mut relay_blocked = false;
        while Instant::now() + Duration::from_secs(1) < lift_at {
            relay_blocked |= self.relay_blocked().await;
            broker_blocked = broker_blocked.max(blocked_connections().await);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let tapped_during = self.tapped().await;
        let partitions: Vec<&str> = self.partition_queues.iter().map(String::as_str).collect();
        let backlog = queue_messages(&partitions).await;
        let acknowledged_during = load.acknowledged().saturating_sub(acknowledged);
        let lifted = chrono::Utc::now();
        drop(alarm);
        tokio::time::sleep_until(lift_at).await;
        self.order_db.set_read_only(false).await.unwrap();

        self.expect(
            fault,
            acknowledged_during > 0,
            format!("{acknowledged_during} commands acknowledged while the order database was read-only"),
        );
        self.expect(
            fault,
            backlog > 0,
            format!("{backlog} user events in the consumer's partition queues (ready or unacknowledged) before it came back"),
        );
        let (written, unpublished) = self.written_between(blocked_from, lifted).await;
        self.expect(
            fault,
            (relay_blocked || broker_blocked > 0) && written > 0 && tapped_before.is_some()
                && tapped_during == tapped_before,
            format!(
                "{broker_blocked} connections the broker listed blocked, the user relay's broker_blocked gauge \
                 {relay_blocked}; {written} user events written under the alarm, the tap on the exchange held \
                 {tapped_before:?} messages then and {tapped_during:?} at its end"
            ),
        );
        // Published once the alarm lifted.
        let published = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let (_, unpublished) = self.written_between(blocked_from, lifted).await;
                if unpublished == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .is_ok();
        self.expect(
            fault,
            published,
            format!("the {written} events written under the alarm ({unpublished} unpublished as it lifted) published after it"),
        );
        // Held, not charged: once everything written before the database
        // came back is applied, the consumer counted no retry and no dead
        // letter.
        let applied = self.everything_written_before_applied(chrono::Utc::now()).await;
        let charged_after = self.consumer_charges().await;
        let charged = match (charged_before, charged_after) {
            (Some((retried, dead)), Some((retried_after, dead_after))) => {
                Some((retried_after - retried, dead_after - dead))
            }
            _ => None,
        };
        self.expect(
            fault,
            applied && charged == Some((0.0, 0.0)),
            format!(
                "the backlog applied after it: {applied}; attempts charged and dead letters meanwhile \
                 (consumer metrics): {charged:?}"
            ),
        );
    }

    /// The consumers' retried events and dead letters, summed over the
    /// order service's instances (`None` when one cannot be scraped).
    async fn consumer_charges(&self) -> Option<(f64, f64)> {
        let mut sums = (0.0, 0.0);
        for node in &self.order_nodes {
            let admin = node.process.as_ref()?.admin_addr?;
            let (status, text) = shop_testkit::http_get(admin, "/metrics").await.ok()?;
            if status != 200 {
                return None;
            }
            sums.0 += sum_samples(&text, "consumer_events_total", Some("outcome=\"retried\""));
            sums.1 += sum_samples(&text, "consumer_dead_letters_total", None);
        }
        Some(sums)
    }

    /// Messages in the user-event tap, which nothing consumes during the
    /// run: every user event the broker took so far, at this moment (a
    /// passive declaration's count, not the broker's periodic statistics).
    async fn tapped(&self) -> Option<u32> {
        let connection = shop_messaging::connection::connect(&self.amqp, "chaos tap count")
            .await
            .ok()?;
        let channel = connection.create_channel().await.ok()?;
        let queue = channel
            .queue_declare(
                self.taps.user.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..lapin::options::QueueDeclareOptions::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .ok()?;
        let _ = connection.close(200, "counted".into()).await;
        Some(queue.message_count())
    }

    /// Whether a user service's relay reports its connection blocked.
    async fn relay_blocked(&self) -> bool {
        for node in &self.user_nodes {
            let Some(admin) = node.process.as_ref().and_then(|p| p.admin_addr) else {
                continue;
            };
            if let Ok((200, text)) = shop_testkit::http_get(admin, "/metrics").await
                && sum_samples(&text, "broker_blocked", Some("outbox relay")) > 0.0
            {
                return true;
            }
        }
        false
    }

    /// User events written between `from` and `to`, and how many of them
    /// are unpublished.
    async fn written_between(
        &self,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
    ) -> (i64, i64) {
        let Ok(client) = connect(self.user_db.url()).await else {
            return (0, -1);
        };
        client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE published_at IS NULL) FROM outbox \
                 WHERE created_at >= $1::text::timestamptz AND created_at < $2::text::timestamptz",
                &[&from.to_rfc3339(), &to.to_rfc3339()],
            )
            .await
            .map_or((0, -1), |row| (row.get(0), row.get(1)))
    }

    /// Waits (up to a minute) until every user event written before
    /// `before` is in the consumer's ledger.
    async fn everything_written_before_applied(&self, before: chrono::DateTime<chrono::Utc>) -> bool {
        let (Ok(users), Ok(orders)) = (
            connect(self.user_db.url()).await,
            connect(self.order_db.url()).await,
        ) else {
            return false;
        };
        let Ok(rows) = users
            .query(
                "SELECT event_id::text FROM outbox WHERE created_at < $1::text::timestamptz",
                &[&before.to_rfc3339()],
            )
            .await
        else {
            return false;
        };
        let ids: Vec<String> = rows.into_iter().map(|row| row.get(0)).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(row) = orders
                .query_one(
                    "SELECT count(DISTINCT event_id) FROM inbox_ledger WHERE event_id::text = ANY($1)",
                    &[&ids],
                )
                .await
                && usize::try_from(row.get::<_, i64>(0)).unwrap_or(0) >= ids.len()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The sum of every sample of `name` (whose labels contain `labels`, when
/// given) in a Prometheus text exposition.
fn sum_samples(text: &str, name: &str, labels: Option<&str>) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|line| labels.is_none_or(|labels| line.contains(labels)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The rows `rabbitmqctl <command> <columns…>` prints for the machine's
/// broker, without headers (nothing when it cannot run).
async fn rabbitmqctl_rows(command_and_columns: &[&str]) -> String {
    let (command, columns) = command_and_columns.split_at(1);
    tokio::process::Command::new("rabbitmqctl")
        .args(command)
        .args(["-q", "--no-table-headers"])
        .args(columns)
        .output()
        .await
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default()
}

/// Connections the machine's broker lists as blocked (a resource alarm in
/// force, and they tried to publish).
async fn blocked_connections() -> usize {
    rabbitmqctl_rows(&["list_connections", "state"])
        .await
        .lines()
        .filter(|line| line.trim() == "blocked")
        .count()
}

/// Messages (ready and unacknowledged) in `queues` of the machine's broker,
/// as `rabbitmqctl list_queues` tells them (its statistics, some seconds
/// old).
async fn queue_messages(queues: &[&str]) -> u64 {
    rabbitmqctl_rows(&["list_queues", "name", "messages"])
        .await
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let name = fields.next()?;
            let messages = fields.next()?.parse::<u64>().ok()?;
            queues.contains(&name).then_some(messages)
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::sum_samples;

    #[test]
    fn samples_are_summed_by_name_and_label() {
        let text =
            "# TYPE x counter\nx{a=\"1\",outcome=\"retried\"} 2\nx{outcome=\"applied\"} 5\nxy 7\nx 1\n";
        assert!((sum_samples(text, "x", Some("outcome=\"retried\"")) - 2.0).abs() < f64::EPSILON);
        assert!((sum_samples(text, "x", None) - 8.0).abs() < f64::EPSILON);
    }
}
