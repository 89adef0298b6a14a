//! The consuming loop: sessions (one consuming and one publishing
//! connection each), the partitions this replica owns (one worker and
//! channel each), and the sweep of parked events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use shop_backoff::Delays;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Consumer;
use super::worker::{Shared, Worker};
use crate::{AmqpConfig, membership, sequence, within};

/// How long a released event may take to come back before the sweep sends
/// it again.
const RELEASE_GRACE: Duration = Duration::from_secs(10);

pub(super) async fn run(consumer: Consumer, shutdown: CancellationToken) -> anyhow::Result<()> {
    let topology = consumer.topology();
    let gap_policy = consumer.gap_policy();
    let Consumer {
        config,
        pool,
        amqp,
        handlers,
        connected,
        resync,
        ..
    } = consumer;
    let remembered = crate::sequence::Remembered::new(config.remembered_positions);
    let Some(seal) = seal_key(&pool, &config, &shutdown).await else {
        return Ok(());
    };
    let checks = config.checks(Some(seal.clone()));
    let shared = Arc::new(Shared {
        config,
        topology,
        pool,
        handlers,
        broker_timeout: amqp.timeout,
        user: amqp.user(),
        member: crate::membership::new_member(),
        in_flight: std::sync::atomic::AtomicI64::new(0),
        remembered: std::sync::Mutex::new(remembered),
        checks,
        seal,
        gap_policy,
        resync,
        resyncing: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    });
    let mut backoff = shared.config.backoff.start();
    tracing::info!(queue = %shared.config.queue, member = %shared.member, partitions = shared.topology.partition_count(), "consumer started");
    // Counters of events that may never happen, exported from the start at
    // zero (their first increase is then seen by `increase()`).
    metrics::counter!("consumer_position_conflicts_total", "queue" => shared.config.queue.clone())
        .increment(0);
    metrics::counter!("consumer_version_conflicts_total", "queue" => shared.config.queue.clone())
        .increment(0);
    super::gaps::register(&shared);
    metrics::counter!("task_restarts_total", "task" => "consumer worker").increment(0);
    let connected_gauge = metrics::gauge!("consumer_connected", "queue" => shared.config.queue.clone());
    // Registered at 0, so that an alert's increase() sees the first one.
    for cause in crate::signing::Unauthenticated::CAUSES {
        metrics::counter!("consumer_unauthenticated_events_total", "queue" => shared.config.queue.clone(), "cause" => cause)
            .increment(0);
    }
    for reason in crate::wire::DeadLetterReason::ALL {
        metrics::counter!("consumer_dead_letters_total", "queue" => shared.config.queue.clone(), "reason" => reason.as_str())
            .increment(0);
    }
    metrics::counter!("consumer_unsigned_events_total", "queue" => shared.config.queue.clone()).increment(0);
    let mut states = connected.subscribe();
    let reporter = tokio::spawn(async move {
        loop {
            let up = *states.borrow_and_update();
            connected_gauge.set(if up { 1.0 } else { 0.0 });
            if states.changed().await.is_err() {
                return;
            }
        }
    });
    while !shutdown.is_cancelled() {
        let result = session(&shared, &amqp, &connected, &shutdown, &mut backoff).await;
        connected.send_replace(false);
        let Err(error) = result else { break };
        let delay = backoff.next_delay();
        if backoff.worth_logging() {
            tracing::warn!(error = format!("{error:#}"), failures = backoff.failures(), retry_in_ms = delay.as_millis() as u64, queue = %shared.config.queue, "consumer disconnected");
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = tokio::time::sleep(delay) => {}
        }
    }
    // The other replicas take this one's partitions at their next heartbeat
    // rather than after the member timeout.
    let queue = shared.config.queue.as_str();
    let left = shared
        .pool
        .run(async |conn| {
            membership::leave(conn, queue, shared.member)
                .await
                .map_err(shop_database::RunError::from)
        })
        .await;
    if let Err(error) = left {
        tracing::debug!(%error, "could not leave the consumer group; the others wait for the member timeout");
    }
    reporter.abort();
    tracing::info!(queue = %shared.config.queue, "consumer stopped");
    Ok(())
}

/// The consumer group's sealing key ([`crate::seal`]), read from (or
/// made in) its database, waiting out an outage; `None` when shutdown came
/// first.
async fn seal_key(
    pool: &shop_database::Pool,
    config: &super::ConsumerConfig,
    shutdown: &CancellationToken,
) -> Option<crate::seal::SealKey> {
    let mut backoff = config.backoff.start();
    loop {
        let loaded: anyhow::Result<_> = pool
            .run(async |conn| crate::seal::load_or_create(conn, &config.queue).await)
            .await;
        let error = match loaded {
            Ok(key) => return Some(key),
            Err(error) => error,
        };
        let delay = backoff.next_delay();
        if backoff.worth_logging() {
            tracing::warn!(error = format!("{error:#}"), retry_in_ms = delay.as_millis() as u64, queue = %config.queue, "could not read the consumer's sealing key");
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One session: connect, declare the topology, then consume the partitions
/// this replica owns until a connection fails, a worker fails, or shutdown.
async fn session(
    shared: &Arc<Shared>,
    amqp: &AmqpConfig,
    connected: &watch::Sender<bool>,
    shutdown: &CancellationToken,
    backoff: &mut Delays,
) -> anyhow::Result<()> {
    let queue = &shared.config.queue;
    let deadline = shared.broker_timeout;
    let connection = crate::connection::connect(amqp, &format!("{queue} consumer")).await?;
    // Retries, dead letters and released events go out on a connection of
    // their own: a broker under a memory or disk alarm blocks every
    // connection that publishes, and a blocked consuming connection could
    // not acknowledge either.
    let publishing = crate::connection::connect(amqp, &format!("{queue} consumer publisher")).await?;
    // Listening from the start: an error the connection reports before the
    // loop below would otherwise go unseen.
    let mut events = std::pin::pin!(connection.events_listener());
    let mut publishing_events = std::pin::pin!(publishing.events_listener());
    let setup = within(deadline, "opening a channel", connection.create_channel()).await??;
    within(
        deadline,
        "declaring the topology",
        shared.topology.declare(&setup),
    )
    .await??;
    let _ = within(
        deadline,
        "closing a channel",
        setup.close(200, "topology declared".into()),
    )
    .await;
    // Queues of an earlier layout: their messages join the partitions. A
    // failure here stops nothing (the queues stay, and are moved at the next
    // start). On a connection of its own: looking for a queue that is not
    // there closes the channel with an error that lapin also reports on the
    // connection's events.
    let retired = within(deadline * 6, "moving retired queues", async {
        let retiring = crate::connection::connect(amqp, &format!("{queue} retiring queues")).await?;
        let moved = shared.topology.retire(&retiring, &shared.user).await;
        let _ = retiring.close(200, "retired queues moved".into()).await;
        moved
    })
    .await;
    match retired {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::warn!(error = format!("{error:#}"), "could not move a retired queue"),
        Err(error) => tracing::warn!(%error, "could not move a retired queue"),
    }
    let sweeper = within(deadline, "opening a channel", publishing.create_channel()).await??;
    within(
        deadline,
        "turning on publisher confirms",
        sweeper.confirm_select(ConfirmSelectOptions { nowait: false }),
    )
    .await??;

    connected.send_replace(true);
    if backoff.failures() > 0 {
        tracing::info!(queue = %queue, failures = backoff.failures(), "consumer reconnected");
    } else {
        tracing::info!(queue = %queue, "consumer connected");
    }
    backoff.reset();

    let stop = shutdown.child_token();
    let mut partitions = Partitions {
        shared: shared.clone(),
        connection: &connection,
        publishing: &publishing,
        workers: JoinSet::new(),
        running: HashMap::new(),
        stop: stop.clone(),
    };
    let mut heartbeat = tokio::time::interval(shared.config.member_timeout / 5);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweep = tokio::time::interval(shared.config.sweep_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut beat_failures = 0_u32;
    // Self-fencing: a replica whose heartbeats fail for the member timeout
    // is no longer a member for the others, which take its partitions; it
    // gives them up too (its workers could apply nothing without their
    // database anyway, and would hold their messages unacknowledged), and
    // takes its share again at the first heartbeat that succeeds.
    let mut last_beat = tokio::time::Instant::now();
    let mut fenced = false;
    let fenced_gauge = metrics::gauge!("consumer_fenced", "queue" => queue.to_string());
    fenced_gauge.set(0.0);
    // A worker ends on shutdown, on a hand-over or on an error of its own
    // channel; a lost connection is reported on the connection's events (a
    // worker waiting on an acknowledgement of the dead connection would
    // never learn of it).
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            () = shutdown.cancelled() => break Ok(()),
            // The broker work of a heartbeat or a sweep waits up to the
            // broker deadline on a dead connection: the connection's own
            // events end it sooner.
            _ = heartbeat.tick() => {
                let rebalanced = tokio::select! {
                    rebalanced = partitions.rebalance() => rebalanced,
                    error = connection_error(events.as_mut()) => break Err(error),
                    error = connection_error(publishing_events.as_mut()) => break Err(error.context("publishing connection")),
                };
                match rebalanced {
                    Ok(()) => {
                        beat_failures = 0;
                        last_beat = tokio::time::Instant::now();
                        if fenced {
                            fenced = false;
                            fenced_gauge.set(0.0);
                            tracing::info!(queue = %queue, "consumer heartbeat succeeds again; consuming this replica's share of the partitions");
                        }
                    }
                    Err(Rebalance::Broker(error)) => break Err(error),
                    Err(Rebalance::Database(error)) => {
                        beat_failures += 1;
                        if beat_failures == 1 || beat_failures.is_power_of_two() {
                            tracing::warn!(error = format!("{error:#}"), failures = beat_failures, "consumer heartbeat failed; the partitions stay until CONSUMER_MEMBER_TIMEOUT");
                        }
                        if !fenced && last_beat.elapsed() >= shared.config.member_timeout {
                            fenced = true;
                            fenced_gauge.set(1.0);
                            let given_up = partitions.fence();
                            tracing::warn!(
                                queue = %queue,
                                partitions = given_up,
                                member_timeout_ms = shared.config.member_timeout.as_millis() as u64,
                                "consumer heartbeat failed for CONSUMER_MEMBER_TIMEOUT; gave up every partition until it succeeds again"
                            );
                        }
                    }
                }
            }
            _ = sweep.tick() => {
                let sampled = tokio::select! {
                    sampled = async {
                        sweep_parked(shared, &sweeper).await;
                        super::gaps::act(shared, &sweeper).await;
                        report_depths(shared, &sweeper).await
                    } => sampled,
                    error = connection_error(events.as_mut()) => break Err(error),
                    error = connection_error(publishing_events.as_mut()) => break Err(error.context("publishing connection")),
                };
                if let Err(error) = sampled {
                    break Err(error.context("sampling the queues"));
                }
            }
            Some(ended) = partitions.workers.join_next_with_id() => {
                if let Err(error) = partitions.ended(ended) {
                    break Err(error);
                }
            }
            error = connection_error(events.as_mut()) => break Err(error),
            error = connection_error(publishing_events.as_mut()) => break Err(error.context("publishing connection")),
        }
    };
    if outcome.is_err() {
        // Reported now, not after the clean-up below (up to the worker
        // drain and the closes' deadlines on a dead connection).
        connected.send_replace(false);
    }
    stop.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while partitions.workers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        // Stuck on the dead connection: what they did not acknowledge is
        // redelivered, and an open transaction rolls back with its connection.
        partitions.workers.abort_all();
    }
    // A connection that failed may never answer its close: a short wait
    // then, not the broker deadline, before reconnecting.
    let closing = if outcome.is_err() {
        deadline.min(Duration::from_secs(1))
    } else {
        deadline
    };
    let _ = futures::join!(
        within(
            closing,
            "closing the connection",
            connection.close(200, "consumer session ending".into()),
        ),
        within(
            closing,
            "closing the connection",
            publishing.close(200, "consumer session ending".into()),
        ),
    );
    // What was delivered and not acknowledged goes back to the queues.
    shared.in_flight.store(0, std::sync::atomic::Ordering::Relaxed);
    outcome
}

/// Why a rebalance failed.
enum Rebalance {
    /// No heartbeat: the split stays as it is.
    Database(anyhow::Error),
    /// A partition could not be started: the session ends.
    Broker(anyhow::Error),
}

/// The partitions this replica consumes, one worker each.
struct Partitions<'a> {
    shared: Arc<Shared>,
    connection: &'a Connection,
    publishing: &'a Connection,
    workers: JoinSet<anyhow::Result<()>>,
    /// Partition → its worker's task id and hand-over token.
    running: HashMap<u16, (tokio::task::Id, CancellationToken)>,
    stop: CancellationToken,
}

impl Partitions<'_> {
    /// Beats, then starts the workers of the partitions this replica now
    /// owns and hands over the ones it no longer owns.
    async fn rebalance(&mut self) -> Result<(), Rebalance> {
        let shared = self.shared.clone();
        let queue = shared.config.queue.as_str();
        let timeout = shared.config.member_timeout;
        let members = shared
            .pool
            .run(async |conn| {
                membership::beat(conn, queue, shared.member, timeout)
                    .await
                    .map_err(shop_database::RunError::from)
            })
            .await
            .map_err(|error| Rebalance::Database(error.into()))?;
        let owned = membership::owned(&members, shared.member, shared.topology.partition_count());
        for (partition, (_, handover)) in &self.running {
            if !owned.contains(partition) {
                handover.cancel();
            }
        }
        let taken: Vec<u16> = owned
            .into_iter()
            .filter(|partition| !self.running.contains_key(partition))
            .collect();
        if !taken.is_empty() {
            // Another replica may have moved these partitions' positions
            // since this one last consumed them.
            shared.remembered().clear();
        }
        for partition in taken {
            self.start(partition).await.map_err(Rebalance::Broker)?;
            tracing::info!(queue, partition, members = members.len(), "consuming a partition");
        }
        Ok(())
    }

    /// Hands over every partition (see the session's self-fencing): each
    /// worker finishes or abandons its batch (unacknowledged, it goes back
    /// to the queue) and closes its channel. Returns how many.
    fn fence(&mut self) -> usize {
        for (_, handover) in self.running.values() {
            handover.cancel();
        }
        self.running.len()
    }

    /// Opens the channels of partition `partition` and starts its worker.
    async fn start(&mut self, partition: u16) -> anyhow::Result<()> {
        let shared = &self.shared;
        let deadline = shared.broker_timeout;
        let channel = within(deadline, "opening a channel", self.connection.create_channel()).await??;
        within(
            deadline,
            "setting the prefetch",
            channel.basic_qos(shared.config.prefetch, BasicQosOptions { global: false }),
        )
        .await??;
        let publisher = open_publisher(self.publishing, deadline).await?;
        let queue = shared.topology.partition_queue(partition);
        let tag = format!("{queue}.{}", Uuid::new_v4().simple());
        let deliveries = within(
            deadline,
            "starting to consume",
            channel.basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await??;
        let handover = self.stop.child_token();
        let worker = Worker {
            shared: shared.clone(),
            partition,
            channel,
            publisher,
            publishing: self.publishing.status().clone(),
            deliveries,
        };
        let id = self.workers.spawn(worker.run(handover.clone())).id();
        self.running.insert(partition, (id, handover));
        Ok(())
    }

    /// A worker ended: after a hand-over that is expected; otherwise the
    /// session ends (and a new one starts after the backoff).
    fn ended(
        &mut self,
        ended: Result<(tokio::task::Id, anyhow::Result<()>), tokio::task::JoinError>,
    ) -> anyhow::Result<()> {
        let (id, outcome) = match ended {
            Ok((id, outcome)) => (id, outcome.map_err(|error| (error, false))),
            Err(error) => (error.id(), Err((anyhow::Error::new(error), true))),
        };
        let Some(partition) = self
            .running
            .iter()
            .find_map(|(partition, (task, _))| (*task == id).then_some(*partition))
        else {
            return Ok(());
        };
        let Some((_, handover)) = self.running.remove(&partition) else {
            return Ok(());
        };
        match outcome {
            Ok(()) if handover.is_cancelled() => {
                tracing::info!(queue = %self.shared.config.queue, partition, "handed a partition over");
                Ok(())
            }
            Ok(()) => anyhow::bail!("the worker of partition {partition} stopped"),
            Err((error, panicked)) => {
                if panicked {
                    // The session ends and a new one starts after the
                    // backoff: the worker is replaced, not lost, and the
                    // replacement is counted.
                    metrics::counter!("task_restarts_total", "task" => "consumer worker").increment(1);
                    return Err(error.context(format!("the worker of partition {partition} panicked")));
                }
                Err(error.context(format!("partition {partition}")))
            }
        }
    }
}

/// A channel in confirm mode on `connection`.
async fn open_publisher(connection: &Connection, deadline: Duration) -> anyhow::Result<Channel> {
    let publisher = within(deadline, "opening a channel", connection.create_channel()).await??;
    within(
        deadline,
        "turning on publisher confirms",
        publisher.confirm_select(ConfirmSelectOptions { nowait: false }),
    )
    .await??;
    Ok(publisher)
}

/// Sends back released events that did not come back in time, forgets
/// parked events that were applied meanwhile, and reports what is parked.
async fn sweep_parked(shared: &Shared, channel: &Channel) {
    let queue = shared.config.queue.as_str();
    let gap_timeout = shared.config.gap_timeout;
    let swept = shared
        .pool
        .run(async |conn| {
            let ready = sequence::take_ready(conn, queue, RELEASE_GRACE, 500).await?;
            sequence::forget_applied(conn, queue).await?;
            sequence::forget_conflicts(conn, queue, shared.config.inbox_retention).await?;
            let stats = sequence::stats(conn, queue, gap_timeout).await?;
            Ok::<_, shop_database::RunError>((ready, stats))
        })
        .await;
    let (ready, stats) = match swept {
        Ok(swept) => swept,
        Err(error) => {
            tracing::debug!(%error, "sweep of parked events failed; the next one tries again");
            return;
        }
    };
    if !ready.is_empty() {
        let router = shared.topology.router();
        match within(
            shared.broker_timeout,
            "sending parked events back",
            sequence::send_back(channel, &router, &ready),
        )
        .await
        {
            Ok(Ok(())) => {
                tracing::info!(queue, events = ready.len(), "sent released events back again");
                super::worker::mark_sent(shared, &ready).await;
            }
            Ok(Err(error)) => tracing::warn!(
                queue,
                error = format!("{error:#}"),
                "could not send released events back; the next sweep tries again"
            ),
            Err(error) => {
                tracing::warn!(queue, %error, "could not send released events back; the next sweep tries again")
            }
        }
    }
    let label = shared.config.queue.clone();
    metrics::gauge!("consumer_parked_events", "queue" => label.clone(), "reason" => sequence::ParkReason::Gap.as_str())
        .set(stats.gaps as f64);
    metrics::gauge!("consumer_parked_events", "queue" => label.clone(), "reason" => sequence::ParkReason::BehindDeadLetter.as_str())
        .set(stats.behind_dead_letters as f64);
    metrics::gauge!("consumer_oldest_parked_seconds", "queue" => label.clone()).set(stats.oldest_seconds);
    metrics::gauge!("consumer_stuck_gaps", "queue" => label).set(stats.stuck as f64);
    if stats.stuck > 0 {
        tracing::warn!(
            queue,
            stuck = stats.stuck,
            gap_timeout_s = gap_timeout.as_secs(),
            "events wait for versions that have not arrived within CONSUMER_GAP_TIMEOUT; see `shop dlq list`"
        );
    }
}

/// `consumer_queue_messages{queue, partition}` (ready messages of each
/// partition queue), `dead_letter_queue_messages{queue}` and
/// `consumer_in_flight_messages{queue}` (delivered to this replica, not yet
/// acknowledged). Every replica samples the same queues.
async fn report_depths(shared: &Shared, channel: &Channel) -> anyhow::Result<()> {
    use lapin::options::QueueDeclareOptions;
    let label = shared.config.queue.clone();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    for partition in 0..shared.topology.partition_count() {
        let queue = shared.topology.partition_queue(partition);
        let declared = within(
            shared.broker_timeout,
            "sampling a queue",
            channel.queue_declare(queue.as_str().into(), passive, FieldTable::default()),
        )
        .await??;
        metrics::gauge!("consumer_queue_messages", "queue" => label.clone(), "partition" => partition.to_string())
            .set(f64::from(declared.message_count()));
    }
    let dead_letters = within(
        shared.broker_timeout,
        "sampling a queue",
        channel.queue_declare(
            shared.topology.dead_letter_queue().as_str().into(),
            passive,
            FieldTable::default(),
        ),
    )
    .await??;
    metrics::gauge!("dead_letter_queue_messages", "queue" => label.clone())
        .set(f64::from(dead_letters.message_count()));
    metrics::gauge!("consumer_in_flight_messages", "queue" => label)
        .set(shared.in_flight.load(std::sync::atomic::Ordering::Relaxed) as f64);
    Ok(())
}

/// The first error the connection reports.
async fn connection_error(
    mut events: std::pin::Pin<&mut impl futures::Stream<Item = lapin::Event>>,
) -> anyhow::Error {
    use futures::StreamExt as _;
    while let Some(event) = events.next().await {
        if let lapin::Event::Error(error) = event {
            return anyhow::Error::new(error).context("connection lost");
        }
    }
    anyhow::anyhow!("connection closed")
}
