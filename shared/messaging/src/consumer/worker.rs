//! One partition's worker: batches, the sequenced transaction, retries and
//! dead letters.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use diesel::ExpressionMethods as _;
use diesel_async::{AsyncConnection as _, AsyncPgConnection, RunQueryDsl as _};
use futures::{FutureExt as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation};
use opentelemetry::trace::TraceContextExt as _;
use shop_backoff::Delays;
use shop_database::{Fault, Pool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

use super::{ConsumerConfig, DeliveryChecks, ErasedHandler, EventMeta, HandlerError, Refusal};
use crate::seal::{self, SealKey};
use crate::sequence::{self, Aggregate, Decision, ParkedEvent};
use crate::topology::ConsumerTopology;
use crate::wire::{self, DeadLetterReason, long_string};
use crate::{inbox, within};

/// What every worker of a consumer shares.
pub(super) struct Shared {
    pub(super) config: ConsumerConfig,
    pub(super) topology: ConsumerTopology,
    pub(super) pool: Pool,
    pub(super) handlers: HashMap<&'static str, Arc<dyn ErasedHandler>>,
    /// Deadline of every broker operation.
    pub(super) broker_timeout: Duration,
    /// The broker user this replica connects as: the `user_id` of every copy
    /// it publishes ([`wire::sent_by`]).
    pub(super) user: String,
    /// This replica's id in the consumer group ([`crate::membership`]).
    pub(super) member: Uuid,
    /// Messages delivered to this replica's workers and not yet
    /// acknowledged.
    pub(super) in_flight: std::sync::atomic::AtomicI64,
    /// The positions this replica committed last ([`sequence::Remembered`]).
    pub(super) remembered: std::sync::Mutex<sequence::Remembered>,
    /// What every delivery is checked against (keys, seal, size).
    pub(super) checks: DeliveryChecks,
    /// The consumer group's seal ([`crate::seal`]).
    pub(super) seal: SealKey,
    /// What the sweep does about a stuck gap.
    pub(super) gap_policy: sequence::GapPolicy,
    /// The producer to ask for snapshots (gap policy `resync`).
    pub(super) resync: Option<Arc<dyn crate::resync::Resync>>,
    /// A resync request is under way (one at a time).
    pub(super) resyncing: Arc<std::sync::atomic::AtomicBool>,
}

impl Shared {
    /// The remembered positions (still usable after a panic elsewhere: a
    /// wrong entry is caught when its position moves).
    pub(super) fn remembered(&self) -> std::sync::MutexGuard<'_, sequence::Remembered> {
        self.remembered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A delivery that passed the checks, with what the handler gets.
struct Incoming {
    delivery: Delivery,
    meta: EventMeta,
    handler: Arc<dyn ErasedHandler>,
    span: tracing::Span,
    /// Its bookkeeping headers carry this group's seal (only then are they
    /// kept on the copies made of it).
    sealed: bool,
}

/// How a copy of a delivery is made.
#[derive(Debug, Clone, Copy)]
struct Copy {
    /// The delivery's bookkeeping headers are sealed: kept (and sealed
    /// again), rather than dropped.
    sealed: bool,
    /// Its producer's signature checked out: as a dead letter, it holds its
    /// aggregate's later events behind it (a stranger's message never does).
    authenticated: bool,
}

/// Why applying failed.
enum ApplyError {
    /// The database is away, silent, read-only, full or overloaded, or the
    /// transaction lost a conflict with another: not the messages' fault.
    /// Hold them (unacknowledged, attempts untouched) and try again.
    Unavailable(anyhow::Error),
    /// A handler, or the transaction itself, failed.
    Failed(HandlerError),
    /// A position decided from memory had moved (another replica applied
    /// the aggregate meanwhile): rolled back, to be decided again from
    /// positions read under their locks.
    Moved,
}

impl ApplyError {
    /// A handler's failure; one caused by the database being unable to do
    /// the work (its statement hit an outage or a conflict) is held, not
    /// charged.
    fn from_handler(error: HandlerError) -> Self {
        match &error {
            HandlerError::Transient(cause) => match cause.downcast_ref::<diesel::result::Error>() {
                Some(database) if Fault::of(database).is_retryable() => Self::Unavailable(error.into()),
                _ => Self::Failed(error),
            },
            HandlerError::Permanent(_) => Self::Failed(error),
        }
    }
}

impl From<diesel::result::Error> for ApplyError {
    fn from(error: diesel::result::Error) -> Self {
        if Fault::of(&error).is_retryable() {
            Self::Unavailable(error.into())
        } else {
            Self::Failed(HandlerError::Transient(error.into()))
        }
    }
}

impl From<shop_database::PoolError> for ApplyError {
    fn from(error: shop_database::PoolError) -> Self {
        Self::Unavailable(error.into())
    }
}

impl From<shop_database::Timeout> for ApplyError {
    fn from(error: shop_database::Timeout) -> Self {
        Self::Unavailable(error.into())
    }
}

/// The worker of one partition queue.
pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    /// Which partition queue it consumes.
    pub(super) partition: u16,
    pub(super) channel: Channel,
    pub(super) publisher: Channel,
    /// The state of the publishing connection (blocked by an alarm?).
    pub(super) publishing: lapin::ConnectionStatus,
    pub(super) deliveries: lapin::Consumer,
}

/// What one transaction did.
#[derive(Default)]
struct Applied {
    applied: usize,
    duplicates: usize,
    parked: usize,
    /// Parked events next in line, to send back after the commit.
    released: Vec<ParkedEvent>,
    /// Events that were to park past the consumer's limits (indices into
    /// the batch): dead-lettered as `park-limit` after the commit.
    refused: Vec<usize>,
    /// The positions of the batch's aggregates, to remember once committed,
    /// with where the rows of those it moved are.
    positions: HashMap<Aggregate, (sequence::Position, Option<sequence::RowId>)>,
    /// Version conflicts recorded for the first time.
    conflicts: usize,
}

impl Worker {
    /// Consumes until `handover` (shutdown, or the partition moved to
    /// another replica): the batch under way is finished and acknowledged,
    /// then the channel is closed, which hands every message it had
    /// prefetched back to the queue (and lets the next consumer in).
    pub(super) async fn run(mut self, handover: CancellationToken) -> anyhow::Result<()> {
        loop {
            let first = tokio::select! {
                biased;
                () = handover.cancelled() => {
                    let _ = within(
                        self.shared.broker_timeout,
                        "closing a channel",
                        self.channel.close(200, "partition handed over".into()),
                    )
                    .await;
                    return Ok(());
                }
                next = self.deliveries.next() => match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(error)) => return Err(error.into()),
                    None => anyhow::bail!("the broker cancelled the consumer"),
                },
            };
            let mut batch = vec![first];
            while batch.len() < usize::from(self.shared.config.batch_size) {
                // Only what has already arrived: a batch never waits.
                match self.deliveries.next().now_or_never() {
                    Some(Some(Ok(delivery))) => batch.push(delivery),
                    _ => break,
                }
            }
            let size = batch.len() as i64;
            self.shared
                .in_flight
                .fetch_add(size, std::sync::atomic::Ordering::Relaxed);
            self.process(batch, &handover).await?;
            self.shared
                .in_flight
                .fetch_sub(size, std::sync::atomic::Ordering::Relaxed);
        }
    }

    async fn process(&self, batch: Vec<Delivery>, stop: &CancellationToken) -> anyhow::Result<()> {
        let mut ready = Vec::with_capacity(batch.len());
        let mut refused = Vec::new();
        for delivery in batch {
            match self.check(delivery) {
                Ok(incoming) => ready.push(incoming),
                Err(refusal) => refused.push(refusal),
            }
        }
        // A flood of refused messages (a stranger's) goes to the dead-letter
        // queue at the broker's pace, not one confirm after another.
        futures::future::try_join_all(
            refused
                .iter()
                .map(|(delivery, refusal)| self.refuse(delivery, refusal)),
        )
        .await?;
        if ready.is_empty() {
            return Ok(());
        }

        let mut backoff =
            shop_backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).start();
        // A redelivery may be a message that took the process down while
        // it was handled: handled alone, each start counted
        // ([`super::crashes`]), so only the culprit's count grows.
        if ready.iter().any(|incoming| incoming.delivery.redelivered) {
            return self.one_by_one(&ready, None, &mut backoff, stop).await;
        }
        let first_failure = loop {
            match self.apply(&ready).await {
                Ok(Applied {
                    released, refused, ..
                }) => {
                    // A fault point for the tests: the process dies between
                    // the commit and the acknowledgement (the batch comes
                    // back, and the sequence and the inbox absorb it).
                    fail::fail_point!("consumer-after-commit", |_| std::process::abort());
                    futures::future::try_join_all(
                        refused
                            .iter()
                            .filter_map(|index| ready.get(*index))
                            .map(|incoming| self.refuse_to_park(incoming)),
                    )
                    .await?;
                    if let Some(last) = ready.last() {
                        // Everything up to the last tag on this channel is in
                        // this batch or was acknowledged before.
                        self.ack(&last.delivery, true).await?;
                    }
                    self.send_back(released).await;
                    return Ok(());
                }
                Err(ApplyError::Unavailable(error)) => {
                    if !self.wait_for_database(&error, &mut backoff, stop).await {
                        return Ok(());
                    }
                }
                // Decided again from the positions read.
                Err(ApplyError::Moved) => {}
                Err(ApplyError::Failed(error)) => break error,
            }
        };

        // A batch of one failed for its own reason; a larger batch is split to
        // find the culprit, one transaction per message.
        let known_failure = (ready.len() == 1).then_some(first_failure);
        self.one_by_one(&ready, known_failure, &mut backoff, stop).await
    }

    /// Applies `ready` one message per transaction (`known_failure`: the
    /// first one's, already known), retrying, dead-lettering and
    /// acknowledging each; a redelivered one's start is counted first
    /// ([`super::crashes`]).
    async fn one_by_one(
        &self,
        ready: &[Incoming],
        mut known_failure: Option<HandlerError>,
        backoff: &mut Delays,
        stop: &CancellationToken,
    ) -> anyhow::Result<()> {
        for incoming in ready {
            let mut counted = false;
            loop {
                if incoming.delivery.redelivered && !counted && known_failure.is_none() {
                    match self.count_start(incoming).await {
                        Ok(Some(times)) => {
                            self.dead_letter_crashed(incoming, times).await?;
                            self.ack(&incoming.delivery, false).await?;
                            break;
                        }
                        Ok(None) => counted = true,
                        Err(error) => {
                            if !self.wait_for_database(&error, backoff, stop).await {
                                return Ok(());
                            }
                            continue;
                        }
                    }
                }
                let outcome = match known_failure.take() {
                    Some(error) => Err(ApplyError::Failed(error)),
                    None => self.apply(std::slice::from_ref(incoming)).await,
                };
                match outcome {
                    Ok(Applied {
                        released, refused, ..
                    }) => {
                        if !refused.is_empty() {
                            self.refuse_to_park(incoming).await?;
                        }
                        self.ack(&incoming.delivery, false).await?;
                        self.send_back(released).await;
                        break;
                    }
                    Err(ApplyError::Unavailable(error)) => {
                        if counted {
                            // Held for the outage, not the message's fault.
                            self.uncount(incoming, true).await;
                            counted = false;
                        }
                        if !self.wait_for_database(&error, backoff, stop).await {
                            return Ok(());
                        }
                    }
                    Err(ApplyError::Moved) => {}
                    Err(ApplyError::Failed(error)) => {
                        // A transient failure while the database cannot take
                        // writes is the outage's, not the message's: it keeps
                        // its attempts.
                        if matches!(error, HandlerError::Transient(_))
                            && !shop_database::probe(&self.shared.pool).await
                        {
                            if counted {
                                self.uncount(incoming, true).await;
                                counted = false;
                            }
                            if !self.wait_for_database(&error.into(), backoff, stop).await {
                                return Ok(());
                            }
                            continue;
                        }
                        self.fail(incoming, error).await?;
                        self.ack(&incoming.delivery, false).await?;
                        break;
                    }
                }
            }
            if counted {
                self.uncount(incoming, false).await;
            }
        }
        Ok(())
    }

    /// Counts the start of a handling of redelivered `incoming`; `Some`
    /// (how many handlings a crash ended) when it is past the consumer's
    /// attempt limit and must not be handled again. An error is the
    /// database's outage; a statement that fails otherwise (a missing
    /// table) is logged and the message handled uncounted.
    async fn count_start(&self, incoming: &Incoming) -> Result<Option<u32>, anyhow::Error> {
        let queue = self.shared.config.queue.as_str();
        let event_id = incoming.meta.event_id;
        let counted = self
            .shared
            .pool
            .run(async |conn| {
                super::crashes::start(conn, queue, event_id)
                    .await
                    .map_err(ApplyError::from)
            })
            .await;
        match counted {
            Ok(handlings) if handlings > self.shared.config.max_attempts => Ok(Some(handlings)),
            Ok(_) => Ok(None),
            Err(ApplyError::Unavailable(error)) => Err(error),
            Err(ApplyError::Failed(error)) => {
                tracing::warn!(parent: &incoming.span, error = format!("{:#}", anyhow::Error::from(error)), "could not count the handling of a redelivered event; handling it uncounted");
                Ok(None)
            }
            Err(ApplyError::Moved) => Ok(None),
        }
    }

    /// Forgets the count of `incoming` (its handling ended with an outcome)
    /// or, with `give_back`, takes back the start just counted (held for an
    /// outage). Best effort: a count left behind is swept by retention.
    async fn uncount(&self, incoming: &Incoming, give_back: bool) {
        let queue = self.shared.config.queue.as_str();
        let event_id = incoming.meta.event_id;
        let done = self
            .shared
            .pool
            .run(async |conn| {
                if give_back {
                    super::crashes::give_back(conn, queue, event_id).await
                } else {
                    super::crashes::forget(conn, queue, event_id).await
                }
                .map_err(shop_database::RunError::from)
            })
            .await;
        if let Err(error) = done {
            tracing::debug!(%error, %event_id, "could not update the crash count of an event; retention sweeps it");
        }
    }

    /// Dead-letters `incoming`, whose handlings a crash ended `times` times,
    /// as `crashed`: its aggregate's later events park behind it.
    async fn dead_letter_crashed(&self, incoming: &Incoming, times: u32) -> anyhow::Result<()> {
        self.dead_letter(
            &incoming.delivery,
            DeadLetterReason::Crashed,
            &super::crashes::reason(times),
            times,
            &incoming.span,
            incoming.copy(),
        )
        .await?;
        self.uncount(incoming, false).await;
        Ok(())
    }

    /// Sends released parked events back to their partition; a failure is
    /// logged and left to the sweep, which sends them again.
    async fn send_back(&self, released: Vec<ParkedEvent>) {
        if released.is_empty() {
            return;
        }
        let router = self.shared.topology.router();
        let sent = within(
            self.shared.broker_timeout,
            "sending parked events back",
            sequence::send_back(&self.publisher, &router, &released),
        )
        .await;
        let error = match sent {
            Ok(Ok(())) => {
                metrics::counter!("consumer_events_total", "queue" => self.shared.config.queue.clone(), "outcome" => "released")
                    .increment(released.len() as u64);
                mark_sent(&self.shared, &released).await;
                return;
            }
            Ok(Err(error)) => format!("{error:#}"),
            Err(error) => error.to_string(),
        };
        tracing::warn!(
            queue = %self.shared.config.queue,
            events = released.len(),
            error,
            "could not send released events back; the sweep sends them again"
        );
    }

    /// Sleeps before the next attempt while the database is away; false when
    /// shutdown came first (the messages stay unacknowledged and are
    /// redelivered).
    async fn wait_for_database(
        &self,
        error: &anyhow::Error,
        backoff: &mut Delays,
        stop: &CancellationToken,
    ) -> bool {
        let delay = backoff.next_delay();
        tracing::warn!(
            error = format!("{error:#}"),
            retry_in_ms = delay.as_millis() as u64,
            "database unavailable, holding the batch"
        );
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// `broker_blocked{connection}` of the publishing connection.
    fn report_blocked(&self, blocked: bool) {
        metrics::gauge!("broker_blocked", "connection" => format!("{} consumer publisher", self.shared.config.queue))
            .set(if blocked { 1.0 } else { 0.0 });
    }

    /// Acknowledges `delivery` (and, with `multiple`, every earlier one on
    /// its channel), within the broker deadline.
    async fn ack(&self, delivery: &Delivery, multiple: bool) -> anyhow::Result<()> {
        within(
            self.shared.broker_timeout,
            "an acknowledgement",
            delivery.acker.ack(BasicAckOptions { multiple }),
        )
        .await??;
        Ok(())
    }

    /// The checks a message must pass before any handler sees it
    /// ([`super::inspect`]).
    #[allow(clippy::result_large_err)] // the delivery travels back to be dead-lettered
    fn check(&self, delivery: Delivery) -> Result<Incoming, (Delivery, Refusal)> {
        let checked = super::inspect(
            &self.shared.checks,
            &delivery.properties,
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            &delivery.data,
            |type_name, body| {
                let handler = self.shared.handlers.get(type_name)?;
                Some(
                    handler
                        .decode(body)
                        .map(|(_, identity)| (handler.clone(), identity)),
                )
            },
        );
        let mut inspected = match checked {
            Ok(inspected) => inspected,
            Err(refusal) => return Err((delivery, refusal)),
        };
        inspected.meta.redelivered = delivery.redelivered;
        if inspected.unsigned {
            metrics::counter!("consumer_unsigned_events_total", "queue" => self.shared.config.queue.clone())
                .increment(1);
        }
        let span = process_span(&self.shared.config.queue, &delivery);
        Ok(Incoming {
            delivery,
            meta: inspected.meta,
            handler: inspected.decoded,
            span,
            sealed: inspected.sealed,
        })
    }

    /// Applies `incoming` in one transaction (see [`crate::sequence`]) and
    /// counts what it did once committed; returns the parked events it
    /// released.
    async fn apply(&self, incoming: &[Incoming]) -> Result<Applied, ApplyError> {
        let started = std::time::Instant::now();
        let done = match self.apply_in_transaction(incoming, true).await {
            Err(ApplyError::Moved) => {
                metrics::counter!("consumer_position_conflicts_total", "queue" => self.shared.config.queue.clone())
                    .increment(1);
                tracing::info!(
                    queue = %self.shared.config.queue,
                    "a remembered position had moved (another replica applied the aggregate); deciding the batch again from the positions"
                );
                {
                    let mut remembered = self.shared.remembered();
                    for (aggregate, _) in incoming.iter().filter_map(|item| item.meta.sequenced()) {
                        remembered.forget(&aggregate);
                    }
                }
                match self.apply_in_transaction(incoming, false).await {
                    // Moved again, under locks: a replica deciding from
                    // memory raced this one; held and tried again.
                    Err(ApplyError::Moved) => {
                        return Err(ApplyError::Unavailable(anyhow::anyhow!(
                            "another replica moved the positions of this batch meanwhile"
                        )));
                    }
                    other => other?,
                }
            }
            other => other?,
        };
        let queue = self.shared.config.queue.clone();
        {
            let mut remembered = self.shared.remembered();
            for (aggregate, (position, row)) in &done.positions {
                remembered.set(aggregate, position, *row);
            }
            metrics::gauge!("consumer_remembered_positions", "queue" => queue.clone())
                .set(remembered.len() as f64);
        }
        metrics::histogram!("consumer_apply_seconds", "queue" => queue.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("consumer_batch_size", "queue" => queue.clone()).record(incoming.len() as f64);
        if done.conflicts > 0 {
            metrics::counter!("consumer_version_conflicts_total", "queue" => queue.clone())
                .increment(done.conflicts as u64);
        }
        for (outcome, count) in [
            ("applied", done.applied),
            ("duplicate", done.duplicates),
            ("parked", done.parked),
        ] {
            if count > 0 || outcome == "applied" {
                metrics::counter!("consumer_events_total", "queue" => queue.clone(), "outcome" => outcome)
                    .increment(count as u64);
            }
        }
        Ok(done)
    }

    /// The transaction of [`Self::apply`]: lock and read the aggregates'
    /// positions (those it can, with `from_memory`, taken from the
    /// remembered ones instead), decide each event (apply, duplicate, park),
    /// record the inbox, park what is ahead, move the positions from where
    /// they were decided (releasing what is next in line), then run the
    /// handlers on what applies.
    async fn apply_in_transaction(
        &self,
        incoming: &[Incoming],
        from_memory: bool,
    ) -> Result<Applied, ApplyError> {
        let transaction = match incoming.first() {
            Some(first) => tracing::info_span!(
                parent: &first.span,
                "db.transaction",
                db.system = "postgresql",
                messaging.batch.message_count = incoming.len(),
            ),
            None => return Ok(Applied::default()),
        };
        for other in incoming.iter().skip(1) {
            transaction.add_link(other.span.context().span().span_context().clone());
        }
        let queue = self.shared.config.queue.as_str();
        let ledger = self.shared.config.ledger;
        let limits = sequence::ParkLimits {
            per_aggregate: self.shared.config.max_parked_per_aggregate,
            total: self.shared.config.max_parked,
        };
        self.shared.pool.run(async |conn| conn.transaction(async |conn| {
            let sequenced: Vec<Option<(Aggregate, i64)>> = incoming.iter().map(|item| item.meta.sequenced()).collect();
            let (recalled, to_read) = if from_memory {
                sequence::from_memory(
                    &mut self.shared.remembered(),
                    sequenced.iter().flatten().map(|(aggregate, version)| (aggregate, *version)),
                )
            } else {
                (HashMap::new(), sequenced.iter().flatten().map(|(aggregate, _)| aggregate).collect())
            };
            let mut positions = sequence::lock(conn, queue, &to_read).await?;
            positions.extend(recalled.iter().map(|(aggregate, (position, _))| (aggregate.clone(), *position)));
            let before: HashMap<Aggregate, i64> =
                positions.iter().map(|(aggregate, position)| (aggregate.clone(), position.last_version)).collect();
            let mut decisions = Vec::with_capacity(incoming.len());
            // The event each aggregate's last version was applied by in this
            // batch, and the repeats of a last version (candidate conflicts).
            let mut applied_by: HashMap<(&Aggregate, i64), Uuid> = HashMap::new();
            let mut repeats: Vec<(&Incoming, &Aggregate, i64)> = Vec::new();
            for (item, sequenced) in incoming.iter().zip(&sequenced) {
                decisions.push(match sequenced {
                    Some((aggregate, version)) => {
                        let snapshot = item.handler.snapshot();
                        let position = positions.entry(aggregate.clone()).or_default();
                        let decision = position.decide_event(*version, snapshot);
                        match decision {
                            Decision::Apply => {
                                applied_by.insert((aggregate, *version), item.meta.event_id);
                            }
                            Decision::Duplicate if !snapshot && *version == position.last_version => {
                                repeats.push((item, aggregate, *version));
                            }
                            _ => {}
                        }
                        decision
                    }
                    None => Decision::Apply,
                });
                if let Decision::Park(reason) = decisions.last().copied().unwrap_or(Decision::Apply) {
                    tracing::info!(parent: &item.span, event_id = %item.meta.event_id, reason = reason.as_str(), "event parked until the versions before it are applied");
                }
            }

            // The inbox, for the events that carry no version: one it
            // already holds is a repeat. A sequenced event's position is its
            // inbox (a version at or below it is a repeat), so it writes no
            // inbox row.
            let ids: Vec<(Uuid, &str)> = incoming
                .iter()
                .zip(&sequenced)
                .filter(|(_, sequenced)| sequenced.is_none())
                .map(|(item, _)| (item.meta.event_id, item.meta.type_name.as_str()))
                .collect();
            let fresh = if ids.is_empty() { HashSet::new() } else { inbox::record(conn, queue, &ids).await? };

            let mut done = Applied::default();
            if !repeats.is_empty() {
                done.conflicts = version_conflicts(conn, queue, &repeats, &applied_by).await?;
            }
            let mut applied_ids = HashSet::with_capacity(ids.len());
            let mut to_park: Vec<(ParkedEvent, usize)> = Vec::new();
            let mut ledger_rows = Vec::new();
            // Runs of consecutive new events of one type, each applied by one
            // handle_batch call.
            let mut runs: Vec<(&Incoming, Vec<(super::Decoded, EventMeta)>)> = Vec::new();
            for (position_in_batch, ((item, decision), sequenced)) in
                incoming.iter().zip(&decisions).zip(&sequenced).enumerate()
            {
                match decision {
                    Decision::Duplicate => {
                        tracing::debug!(parent: &item.span, event_id = %item.meta.event_id, "duplicate event skipped");
                        done.duplicates += 1;
                        continue;
                    }
                    Decision::Park(_) => {
                        if let Some((aggregate, version)) = sequenced {
                            to_park.push((
                                ParkedEvent::new(
                                    aggregate,
                                    *version,
                                    item.meta.event_id,
                                    &item.meta.type_name,
                                    &item.delivery.data,
                                    &item.delivery.properties,
                                ),
                                position_in_batch,
                            ));
                        }
                        done.parked += 1;
                        continue;
                    }
                    Decision::Apply => {}
                }
                let repeat = sequenced.is_none() && !fresh.contains(&item.meta.event_id);
                if repeat || !applied_ids.insert(item.meta.event_id) {
                    tracing::debug!(parent: &item.span, event_id = %item.meta.event_id, "duplicate event skipped");
                    done.duplicates += 1;
                    continue;
                }
                let (event, _) = item
                    .handler
                    .decode(&item.delivery.data)
                    .map_err(|error| ApplyError::Failed(HandlerError::permanent(error)))?;
                done.applied += 1;
                if ledger {
                    ledger_rows.push(&item.meta);
                }
                match runs.last_mut() {
                    Some((first, events)) if Arc::ptr_eq(&first.handler, &item.handler) => {
                        events.push((event, item.meta.clone()));
                    }
                    _ => runs.push((item, vec![(event, item.meta.clone())])),
                }
            }
            let (to_park, positions_in_batch): (Vec<ParkedEvent>, Vec<usize>) = to_park.into_iter().unzip();
            let to_park = if to_park.is_empty() {
                to_park
            } else {
                let admitted = sequence::admit(conn, queue, &to_park, &limits).await?;
                let mut kept = Vec::with_capacity(to_park.len());
                for ((event, index), admitted) in to_park.into_iter().zip(positions_in_batch).zip(admitted) {
                    if admitted {
                        kept.push(event);
                    } else {
                        done.parked -= 1;
                        done.refused.push(index);
                    }
                }
                kept
            };
            sequence::park(conn, queue, &to_park).await?;
            let moves: Vec<sequence::Move<'_>> = positions
                .iter()
                .map(|(aggregate, position)| sequence::Move {
                    aggregate,
                    from: before.get(aggregate).copied().unwrap_or(0),
                    to: position.last_version,
                    row: recalled.get(aggregate).and_then(|(_, row)| *row),
                    event: applied_by.get(&(aggregate, position.last_version)).copied(),
                })
                .filter(|change| change.to > change.from)
                .collect();
            let advanced = sequence::advance(conn, queue, &moves).await?;
            if advanced.moved.len() != moves.len() {
                return Err(ApplyError::Moved);
            }
            done.released = advanced.released;
            let mut moved: HashMap<Aggregate, Option<sequence::RowId>> = advanced.moved.into_iter().collect();
            // The positions moved first: a batch decided from positions
            // another replica has moved meanwhile rolls back before any
            // handler sees it, and the rows stay locked until the commit.
            for (first, events) in runs {
                first
                    .handler
                    .handle_batch(conn, events)
                    .instrument(first.span.clone())
                    .await
                    .map_err(ApplyError::from_handler)?;
            }
            if !ledger_rows.is_empty() {
                write_ledger(conn, queue, &ledger_rows).await?;
            }
            done.positions = positions
                .into_iter()
                .map(|(aggregate, position)| {
                    let row = moved.remove(&aggregate).flatten();
                    (aggregate, (position, row))
                })
                .collect();
            Ok(done)
        }).await)
        .instrument(transaction)
        .await
    }

    /// Sends a message whose handler failed to its next delay queue or, when
    /// it has no attempts left or can never succeed, to the dead-letter
    /// queue.
    async fn fail(&self, incoming: &Incoming, error: HandlerError) -> anyhow::Result<()> {
        let attempt = incoming.meta.attempt;
        let (reason, text) = match &error {
            HandlerError::Permanent(error) => (DeadLetterReason::Rejected, format!("{error:#}")),
            HandlerError::Transient(error) if attempt >= self.shared.config.max_attempts => {
                (DeadLetterReason::MaxAttempts, format!("{error:#}"))
            }
            HandlerError::Transient(error) => {
                let text = format!("{error:#}");
                let step = (attempt as usize)
                    .saturating_sub(1)
                    .min(self.shared.config.retry_delays.len().saturating_sub(1));
                if self.shared.config.retry_delays.is_empty() {
                    return self
                        .dead_letter(
                            &incoming.delivery,
                            DeadLetterReason::MaxAttempts,
                            &text,
                            attempt,
                            &incoming.span,
                            incoming.copy(),
                        )
                        .await;
                }
                let queue = self.shared.topology.retry_queue(step);
                let mut headers = FieldTable::default();
                headers.insert(
                    wire::ATTEMPT.into(),
                    AMQPValue::LongLongInt(i64::from(attempt) + 1),
                );
                headers.insert(wire::LAST_ERROR.into(), long_string(&truncate(&text)));
                self.republish(&incoming.delivery, &queue, headers, incoming.sealed)
                    .await?;
                metrics::counter!("consumer_events_total", "queue" => self.shared.config.queue.clone(), "outcome" => "retried")
                    .increment(1);
                tracing::warn!(
                    parent: &incoming.span,
                    event_id = %incoming.meta.event_id,
                    attempt,
                    retry_queue = %queue,
                    error = %text,
                    "handler failed, retrying later"
                );
                return Ok(());
            }
        };
        self.dead_letter(
            &incoming.delivery,
            reason,
            &text,
            attempt,
            &incoming.span,
            incoming.copy(),
        )
        .await
    }

    /// Dead-letters and acknowledges a delivery the checks refused.
    async fn refuse(&self, delivery: &Delivery, refusal: &Refusal) -> anyhow::Result<()> {
        let sealed = self.shared.seal.verify(&delivery.properties);
        let attempt = if sealed { attempt_of(delivery) } else { 1 };
        let span = process_span(&self.shared.config.queue, delivery);
        if let Some(cause) = refusal.cause {
            metrics::counter!("consumer_unauthenticated_events_total", "queue" => self.shared.config.queue.clone(), "cause" => cause)
                .increment(1);
        }
        let copy = Copy {
            sealed,
            authenticated: refusal.authenticated,
        };
        self.dead_letter(delivery, refusal.reason, &refusal.error, attempt, &span, copy)
            .await?;
        self.ack(delivery, false).await
    }

    /// Dead-letters an event that was to park while the consumer holds as
    /// many parked events as it may (`CONSUMER_MAX_PARKED_PER_AGGREGATE`,
    /// `CONSUMER_MAX_PARKED`): kept whole in the dead-letter queue, to be
    /// replayed once the parked events have drained.
    async fn refuse_to_park(&self, incoming: &Incoming) -> anyhow::Result<()> {
        let text = format!(
            "parking is full: at most {} events per aggregate and {} in all may wait for their turn",
            self.shared.config.max_parked_per_aggregate, self.shared.config.max_parked
        );
        self.dead_letter(
            &incoming.delivery,
            DeadLetterReason::ParkLimit,
            &text,
            incoming.meta.attempt,
            &incoming.span,
            // Ahead of its aggregate's next version: it holds nothing.
            Copy {
                sealed: incoming.sealed,
                authenticated: false,
            },
        )
        .await
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: DeadLetterReason,
        error: &str,
        attempts: u32,
        span: &tracing::Span,
        copy: Copy,
    ) -> anyhow::Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(wire::DEAD_LETTER_REASON.into(), long_string(reason.as_str()));
        headers.insert(wire::DEAD_LETTER_ERROR.into(), long_string(&truncate(error)));
        headers.insert(
            wire::DEAD_LETTER_ATTEMPTS.into(),
            AMQPValue::LongLongInt(i64::from(attempts)),
        );
        headers.insert(
            wire::DEAD_LETTERED_AT.into(),
            long_string(&chrono::Utc::now().to_rfc3339()),
        );
        let queue = self.shared.topology.dead_letter_queue();
        self.republish(delivery, &queue, headers, copy.sealed).await?;
        if copy.authenticated {
            self.hold_followers(delivery).await;
        }
        let consumer_queue = self.shared.config.queue.clone();
        metrics::counter!("consumer_events_total", "queue" => consumer_queue.clone(), "outcome" => "dead_lettered")
            .increment(1);
        metrics::counter!("consumer_dead_letters_total", "queue" => consumer_queue, "reason" => reason.as_str())
            .increment(1);
        tracing::warn!(
            parent: span,
            reason = %reason,
            error,
            attempts,
            message_id = ?delivery.properties.message_id().as_ref().map(|id| id.as_str()),
            dead_letter_queue = %queue,
            partition = self.partition,
            "message dead-lettered"
        );
        Ok(())
    }

    /// Records a dead-lettered event as what holds its aggregate's next
    /// version, so its followers park behind it by that name. Best effort:
    /// if the database is away they park all the same, as behind a gap.
    async fn hold_followers(&self, delivery: &Delivery) {
        let headers = delivery.properties.headers().as_ref();
        let sequenced = headers.and_then(sequence::sequenced_by);
        let event_id = delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| Uuid::try_parse(id.as_str()).ok());
        let (Some((aggregate, version)), Some(event_id)) = (sequenced, event_id) else {
            return;
        };
        let queue = self.shared.config.queue.as_str();
        let marked = self
            .shared
            .pool
            .run(async |conn| {
                conn.transaction(async |conn| {
                    sequence::mark_dead_letter(conn, queue, &aggregate, version, event_id).await
                })
                .await
                .map_err(shop_database::RunError::from)
            })
            .await;
        if let Err(error) = marked {
            tracing::warn!(%error, %aggregate, version, "could not record the dead letter that holds its aggregate");
        }
    }

    /// Publishes a copy of `delivery` to `queue` (a queue of the group)
    /// through the group's `<group>.queues` exchange, with `extra` headers,
    /// the original routing kept, sealed (bookkeeping from outside, on a
    /// delivery that was not `sealed`, is dropped first) and this replica's
    /// broker user as its `user_id`, and waits for the broker's confirm.
    async fn republish(
        &self,
        delivery: &Delivery,
        queue: &str,
        extra: FieldTable,
        sealed: bool,
    ) -> anyhow::Result<()> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        if !sealed {
            seal::strip(&mut headers);
        }
        let has = |headers: &FieldTable, key: &str| {
            headers
                .inner()
                .contains_key(&lapin::types::ShortString::from(key))
        };
        if !has(&headers, wire::ORIGINAL_EXCHANGE) {
            headers.insert(
                wire::ORIGINAL_EXCHANGE.into(),
                long_string(delivery.exchange.as_str()),
            );
        }
        if !has(&headers, wire::ORIGINAL_ROUTING_KEY) {
            headers.insert(
                wire::ORIGINAL_ROUTING_KEY.into(),
                long_string(delivery.routing_key.as_str()),
            );
        }
        headers.insert(
            wire::ORIGINAL_QUEUE.into(),
            long_string(&self.shared.config.queue),
        );
        for (key, value) in extra.inner() {
            headers.insert(key.clone(), value.clone());
        }
        let message_id = delivery.properties.message_id().as_ref().map(|id| id.as_str());
        self.shared.seal.seal_into(message_id, &mut headers);
        let properties = wire::sent_by(
            delivery.properties.clone().with_headers(headers),
            &self.shared.user,
        );
        let exchange = self.shared.topology.queues_exchange();
        let published = async {
            self.publisher
                .basic_publish(
                    exchange.as_str().into(),
                    queue.into(),
                    // Mandatory: a missing queue comes back as a return instead
                    // of silently dropping the message.
                    BasicPublishOptions {
                        mandatory: true,
                        immediate: false,
                    },
                    &delivery.data,
                    properties,
                )
                .await?
                .await
        };
        // A broker under a memory or disk alarm blocks publishing: the copy
        // waits (the worker with it; the other workers go on) rather than
        // failing, which would only redeliver and publish it again.
        let mut published = std::pin::pin!(published);
        let mut reported = false;
        let confirm = loop {
            match tokio::time::timeout(self.shared.broker_timeout, &mut published).await {
                Ok(confirm) => break confirm?,
                Err(_) if self.publishing.blocked() => {
                    self.report_blocked(true);
                    if !reported {
                        tracing::warn!(
                            queue,
                            "the broker blocks publishing (memory or disk alarm); the copy waits"
                        );
                        reported = true;
                    }
                }
                Err(_) => {
                    return Err(crate::Timeout {
                        operation: "a publisher confirm",
                        deadline: self.shared.broker_timeout,
                    }
                    .into());
                }
            }
        };
        self.report_blocked(false);
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => anyhow::bail!("queue {queue} does not exist"),
            Confirmation::Nack(_) => anyhow::bail!("the broker refused the copy for {queue}"),
        }
    }
}

impl Incoming {
    /// How copies of it are made.
    fn copy(&self) -> Copy {
        Copy {
            sealed: self.sealed,
            authenticated: true,
        }
    }
}

/// The attempt a sealed delivery is on: the `attempt` header, 1 without it.
fn attempt_of(delivery: &Delivery) -> u32 {
    super::attempt(&delivery.properties)
}

/// The consumer span of one message, continuing the trace in its headers.
fn process_span(queue: &str, delivery: &Delivery) -> tracing::Span {
    let span = tracing::info_span!(
        "messaging.process",
        otel.name = %format_args!("{queue} process"),
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "process",
        messaging.operation.name = "consume",
        messaging.destination.name = %queue,
        messaging.rabbitmq.destination.routing_key = ?delivery.routing_key.as_str(),
        messaging.message.id = ?delivery.properties.message_id().as_ref().map(|id| id.as_str()),
        messaging.message.body.size = delivery.data.len(),
    );
    let parent = wire::extract_trace(delivery.properties.headers().as_ref());
    let _ = span.set_parent(parent);
    span
}

/// The version conflicts among `repeats` (events of a batch at their
/// aggregate's last version, not snapshots): those whose event id is not
/// the one applied at that version, by this batch (`applied_by`) or before
/// (the position's `last_event`, read with the aggregates locked). Each is
/// logged and recorded (a repeat of one recorded before is not counted
/// again); none is applied. Returns how many are new.
async fn version_conflicts(
    conn: &mut AsyncPgConnection,
    queue: &str,
    repeats: &[(&Incoming, &Aggregate, i64)],
    applied_by: &HashMap<(&Aggregate, i64), Uuid>,
) -> diesel::QueryResult<usize> {
    let unknown: Vec<&Aggregate> = repeats
        .iter()
        .filter(|(_, aggregate, version)| !applied_by.contains_key(&(*aggregate, *version)))
        .map(|(_, aggregate, _)| *aggregate)
        .collect();
    let recorded = sequence::last_events(conn, queue, &unknown).await?;
    let mut conflicts = Vec::new();
    for (item, aggregate, version) in repeats {
        let applied = applied_by.get(&(*aggregate, *version)).copied().or_else(|| {
            recorded
                .get(*aggregate)
                .filter(|(last, _)| last == version)
                .map(|(_, event)| *event)
        });
        let Some(applied) = applied.filter(|applied| *applied != item.meta.event_id) else {
            continue;
        };
        tracing::warn!(
            parent: &item.span,
            queue,
            %aggregate,
            version,
            event_id = %item.meta.event_id,
            applied_event = %applied,
            "version conflict: another event was applied at this version; not applied (see `shop dlq list`)"
        );
        conflicts.push((
            (*aggregate).clone(),
            *version,
            item.meta.event_id,
            item.meta.type_name.as_str(),
            applied,
        ));
    }
    sequence::record_conflicts(conn, queue, &conflicts).await
}

/// Header values stay small: error texts are cut at 1 KiB.
fn truncate(text: &str) -> String {
    const MAX: usize = 1024;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

diesel::table! {
    /// Every application, in order (`CONSUMER_LEDGER`).
    inbox_ledger (seq) {
        seq -> BigInt,
        consumer -> Text,
        event_id -> Uuid,
        aggregate_type -> Nullable<Text>,
        aggregate_id -> Nullable<Text>,
        aggregate_version -> Nullable<BigInt>,
        applied_at -> Timestamptz,
    }
}

/// Appends the events handed to the handlers to the ledger, in the order
/// they were handed over.
async fn write_ledger(
    conn: &mut AsyncPgConnection,
    queue: &str,
    applied: &[&EventMeta],
) -> diesel::QueryResult<()> {
    let rows: Vec<_> = applied
        .iter()
        .map(|meta| {
            (
                inbox_ledger::consumer.eq(queue),
                inbox_ledger::event_id.eq(meta.event_id),
                inbox_ledger::aggregate_type.eq(meta.aggregate_type.as_deref()),
                inbox_ledger::aggregate_id.eq(meta.aggregate_id.as_deref()),
                inbox_ledger::aggregate_version.eq(meta.aggregate_version),
            )
        })
        .collect();
    diesel::insert_into(inbox_ledger::table)
        .values(rows)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records that `released` were sent back and confirmed, so the sweep does
/// not send them again. Best effort: unrecorded, they are sent once more
/// after the grace, and the copy is a duplicate the sequence drops.
pub(super) async fn mark_sent(shared: &Shared, released: &[ParkedEvent]) {
    let queue = shared.config.queue.as_str();
    let marked = shared
        .pool
        .run(async |conn| {
            sequence::mark_sent(conn, queue, released)
                .await
                .map_err(shop_database::RunError::from)
        })
        .await;
    if let Err(error) = marked {
        tracing::debug!(%error, queue, "could not record released events as sent back; the sweep may send them again");
    }
}
