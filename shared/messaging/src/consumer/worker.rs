//! The consuming loop: sessions (one connection each), workers (one channel
//! each), batches.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use diesel_async::AsyncConnection as _;
use futures::{FutureExt as _, StreamExt as _};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation};
use opentelemetry::trace::TraceContextExt as _;
use shop_backoff::Delays;
use shop_database::{Fault, Pool};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use uuid::Uuid;

use super::{Consumer, ConsumerConfig, ErasedHandler, EventMeta, HandlerError};
use crate::topology::ConsumerTopology;
use crate::wire::{self, DeadLetterReason, long_string};
use crate::{AmqpConfig, inbox, within};

/// What every worker of a consumer shares.
struct Shared {
    config: ConsumerConfig,
    topology: ConsumerTopology,
    pool: Pool,
    handlers: std::collections::HashMap<&'static str, Arc<dyn ErasedHandler>>,
    /// Deadline of every broker operation.
    broker_timeout: Duration,
}

pub(super) async fn run(consumer: Consumer, shutdown: CancellationToken) -> anyhow::Result<()> {
    let topology = consumer.topology();
    let Consumer {
        config,
        pool,
        amqp,
        handlers,
        connected,
        ..
    } = consumer;
    let shared = Arc::new(Shared {
        config,
        topology,
        pool,
        handlers,
        broker_timeout: amqp.timeout,
    });
    let mut backoff = shared.config.backoff.start();
    tracing::info!(queue = %shared.config.queue, "consumer started");
    let connected_gauge = metrics::gauge!("consumer_connected", "queue" => shared.config.queue.clone());
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
    reporter.abort();
    tracing::info!(queue = %shared.config.queue, "consumer stopped");
    Ok(())
}

/// One connection: declare the topology, run the workers until one fails or
/// shutdown, close.
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
    // Retries and dead letters go out on a connection of their own: a broker
    // under a memory or disk alarm blocks every connection that publishes,
    // and a blocked consuming connection could not acknowledge either.
    let publishing = crate::connection::connect(amqp, &format!("{queue} consumer publisher")).await?;
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

    let stop = shutdown.child_token();
    let mut workers = JoinSet::new();
    for n in 0..shared.config.concurrency.max(1) {
        let channel = within(deadline, "opening a channel", connection.create_channel()).await??;
        within(
            deadline,
            "setting the prefetch",
            channel.basic_qos(shared.config.prefetch, BasicQosOptions { global: false }),
        )
        .await??;
        let publisher = within(deadline, "opening a channel", publishing.create_channel()).await??;
        within(
            deadline,
            "turning on publisher confirms",
            publisher.confirm_select(ConfirmSelectOptions { nowait: false }),
        )
        .await??;
        let tag = format!("{queue}.{n}.{}", Uuid::new_v4().simple());
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
        let worker = Worker {
            shared: shared.clone(),
            channel,
            publisher,
            publishing: publishing.status().clone(),
            deliveries,
            tag,
        };
        workers.spawn(worker.run(stop.clone()));
    }
    connected.send_replace(true);
    if backoff.failures() > 0 {
        tracing::info!(queue = %queue, failures = backoff.failures(), "consumer reconnected");
    } else {
        tracing::info!(queue = %queue, "consumer connected");
    }
    backoff.reset();

    // A worker ends on shutdown or on an error of its own channel; a lost
    // connection is reported on the connection's events (a worker waiting on
    // an acknowledgement of the dead connection would never learn of it).
    let mut events = std::pin::pin!(connection.events_listener());
    let mut publishing_events = std::pin::pin!(publishing.events_listener());
    let first = tokio::select! {
        first = workers.join_next() => first,
        error = connection_error(events.as_mut()) => Some(Ok(Err(error))),
        error = connection_error(publishing_events.as_mut()) => Some(Ok(Err(error.context("publishing connection")))),
    };
    stop.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(5), async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        // Stuck on the dead connection: what they did not acknowledge is
        // redelivered, and an open transaction rolls back with its connection.
        workers.abort_all();
    }
    for connection in [&connection, &publishing] {
        let _ = within(
            deadline,
            "closing the connection",
            connection.close(200, "consumer session ending".into()),
        )
        .await;
    }
    match first {
        Some(Ok(Ok(()))) if shutdown.is_cancelled() => Ok(()),
        Some(Ok(Ok(()))) | None => anyhow::bail!("a worker stopped"),
        Some(Ok(Err(error))) => Err(error),
        Some(Err(error)) => {
            // The session ends and a new one starts after the backoff: the
            // worker is replaced, not lost, and the replacement is counted.
            metrics::counter!("task_restarts_total", "task" => "consumer worker").increment(1);
            Err(anyhow::Error::new(error).context("a worker panicked"))
        }
    }
}

/// The first error the connection reports.
async fn connection_error(
    mut events: std::pin::Pin<&mut impl futures::Stream<Item = lapin::Event>>,
) -> anyhow::Error {
    while let Some(event) = events.next().await {
        if let lapin::Event::Error(error) = event {
            return anyhow::Error::new(error).context("connection lost");
        }
    }
    anyhow::anyhow!("connection closed")
}

/// A delivery that passed the checks, with what the handler gets.
struct Incoming {
    delivery: Delivery,
    meta: EventMeta,
    handler: Arc<dyn ErasedHandler>,
    span: tracing::Span,
}

/// Why applying failed.
enum ApplyError {
    /// The database is away, silent, read-only, full or overloaded, or the
    /// transaction lost a conflict with another: not the messages' fault.
    /// Hold them (unacknowledged, attempts untouched) and try again.
    Unavailable(anyhow::Error),
    /// A handler, or the transaction itself, failed.
    Failed(HandlerError),
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

struct Worker {
    shared: Arc<Shared>,
    channel: Channel,
    publisher: Channel,
    /// The state of the publishing connection (blocked by an alarm?).
    publishing: lapin::ConnectionStatus,
    deliveries: lapin::Consumer,
    tag: String,
}

impl Worker {
    async fn run(mut self, stop: CancellationToken) -> anyhow::Result<()> {
        loop {
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => {
                    let _ = self.channel.basic_cancel(self.tag.as_str().into(), lapin::options::BasicCancelOptions::default()).await;
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
            self.process(batch, &stop).await?;
        }
    }

    async fn process(&self, batch: Vec<Delivery>, stop: &CancellationToken) -> anyhow::Result<()> {
        let mut ready = Vec::with_capacity(batch.len());
        for delivery in batch {
            match self.check(delivery) {
                Ok(incoming) => ready.push(incoming),
                Err((delivery, reason, error)) => {
                    let attempt = attempt_of(&delivery);
                    let span = process_span(&self.shared.config.queue, &delivery);
                    self.dead_letter(&delivery, reason, &error, attempt, &span)
                        .await?;
                    self.ack(&delivery, false).await?;
                }
            }
        }
        if ready.is_empty() {
            return Ok(());
        }

        let mut backoff =
            shop_backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).start();
        let first_failure = loop {
            match self.apply(&ready).await {
                Ok(()) => {
                    // A fault point for the tests: the process dies between
                    // the commit and the acknowledgement (the batch comes
                    // back, and the inbox absorbs it).
                    fail::fail_point!("consumer-after-commit", |_| std::process::abort());
                    if let Some(last) = ready.last() {
                        // Everything up to the last tag on this channel is in
                        // this batch or was acknowledged before.
                        self.ack(&last.delivery, true).await?;
                    }
                    return Ok(());
                }
                Err(ApplyError::Unavailable(error)) => {
                    if !self.wait_for_database(&error, &mut backoff, stop).await {
                        return Ok(());
                    }
                }
                Err(ApplyError::Failed(error)) => break error,
            }
        };

        // A batch of one failed for its own reason; a larger batch is split to
        // find the culprit, one transaction per message.
        let mut known_failure = (ready.len() == 1).then_some(first_failure);
        for incoming in &ready {
            loop {
                let outcome = match known_failure.take() {
                    Some(error) => Err(ApplyError::Failed(error)),
                    None => self.apply(std::slice::from_ref(incoming)).await,
                };
                match outcome {
                    Ok(()) => {
                        self.ack(&incoming.delivery, false).await?;
                        break;
                    }
                    Err(ApplyError::Unavailable(error)) => {
                        if !self.wait_for_database(&error, &mut backoff, stop).await {
                            return Ok(());
                        }
                    }
                    Err(ApplyError::Failed(error)) => {
                        // A transient failure while the database cannot take
                        // writes is the outage's, not the message's: it keeps
                        // its attempts.
                        if matches!(error, HandlerError::Transient(_))
                            && !shop_database::probe(&self.shared.pool).await
                        {
                            if !self.wait_for_database(&error.into(), &mut backoff, stop).await {
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
        }
        Ok(())
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

    /// The checks a message must pass before any handler sees it.
    #[allow(clippy::result_large_err)] // the delivery travels back to be dead-lettered
    fn check(&self, delivery: Delivery) -> Result<Incoming, (Delivery, DeadLetterReason, String)> {
        let checked = super::inspect(
            &delivery.properties,
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
            &delivery.data,
            |type_name, body| {
                let handler = self.shared.handlers.get(type_name)?;
                Some(handler.decode(body).map(|_| handler.clone()))
            },
        );
        let (meta, handler) = match checked {
            Ok(checked) => checked,
            Err((reason, error)) => return Err((delivery, reason, error)),
        };
        let span = process_span(&self.shared.config.queue, &delivery);
        Ok(Incoming {
            delivery,
            meta,
            handler,
            span,
        })
    }

    /// Applies `incoming` in one transaction: inbox first, then the handlers
    /// of the events that are new; counts them once committed.
    async fn apply(&self, incoming: &[Incoming]) -> Result<(), ApplyError> {
        let started = std::time::Instant::now();
        let duplicates = self.apply_in_transaction(incoming).await?;
        let queue = self.shared.config.queue.clone();
        metrics::histogram!("consumer_apply_seconds", "queue" => queue.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("consumer_batch_size", "queue" => queue.clone()).record(incoming.len() as f64);
        metrics::counter!("consumer_events_total", "queue" => queue.clone(), "outcome" => "applied")
            .increment((incoming.len() - duplicates) as u64);
        if duplicates > 0 {
            metrics::counter!("consumer_events_total", "queue" => queue, "outcome" => "duplicate")
                .increment(duplicates as u64);
        }
        Ok(())
    }

    /// The transaction of [`Self::apply`]; returns how many events were
    /// duplicates.
    async fn apply_in_transaction(&self, incoming: &[Incoming]) -> Result<usize, ApplyError> {
        let transaction = match incoming.first() {
            Some(first) => tracing::info_span!(
                parent: &first.span,
                "db.transaction",
                db.system = "postgresql",
                messaging.batch.message_count = incoming.len(),
            ),
            None => return Ok(0),
        };
        for other in incoming.iter().skip(1) {
            transaction.add_link(other.span.context().span().span_context().clone());
        }
        let queue = self.shared.config.queue.as_str();
        self.shared.pool.run(async |conn| conn.transaction(async |conn| {
            let ids: Vec<(Uuid, &str)> = incoming.iter().map(|i| (i.meta.event_id, i.meta.type_name.as_str())).collect();
            let fresh = inbox::record(conn, queue, &ids).await?;
            let mut applied = HashSet::with_capacity(fresh.len());
            let mut duplicates = 0;
            // Runs of consecutive new events of one type, each applied by one
            // handle_batch call.
            let mut runs: Vec<(&Incoming, Vec<(super::Decoded, EventMeta)>)> = Vec::new();
            for item in incoming {
                if !fresh.contains(&item.meta.event_id) || !applied.insert(item.meta.event_id) {
                    tracing::debug!(parent: &item.span, event_id = %item.meta.event_id, "duplicate event skipped");
                    duplicates += 1;
                    continue;
                }
                let event = item
                    .handler
                    .decode(&item.delivery.data)
                    .map_err(|error| ApplyError::Failed(HandlerError::permanent(error)))?;
                match runs.last_mut() {
                    Some((first, events)) if Arc::ptr_eq(&first.handler, &item.handler) => {
                        events.push((event, item.meta.clone()));
                    }
                    _ => runs.push((item, vec![(event, item.meta.clone())])),
                }
            }
            for (first, events) in runs {
                first
                    .handler
                    .handle_batch(conn, events)
                    .instrument(first.span.clone())
                    .await
                    .map_err(ApplyError::from_handler)?;
            }
            Ok(duplicates)
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
                self.republish(&incoming.delivery, &queue, headers).await?;
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
        self.dead_letter(&incoming.delivery, reason, &text, attempt, &incoming.span)
            .await
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: DeadLetterReason,
        error: &str,
        attempts: u32,
        span: &tracing::Span,
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
        self.republish(delivery, &queue, headers).await?;
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
            "message dead-lettered"
        );
        Ok(())
    }

    /// Publishes a copy of `delivery` to `queue` through the default
    /// exchange, with `extra` headers and the original routing kept, and
    /// waits for the broker's confirm.
    async fn republish(&self, delivery: &Delivery, queue: &str, extra: FieldTable) -> anyhow::Result<()> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
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
        let properties = delivery.properties.clone().with_headers(headers);
        let published = async {
            self.publisher
                .basic_publish(
                    "".into(),
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

/// The attempt a delivery is on: the `attempt` header, 1 without it.
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
        messaging.rabbitmq.destination.routing_key = %delivery.routing_key,
        messaging.message.id = ?delivery.properties.message_id().as_ref().map(|id| id.as_str()),
        messaging.message.body.size = delivery.data.len(),
    );
    let parent = wire::extract_trace(delivery.properties.headers().as_ref());
    let _ = span.set_parent(parent);
    span
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
