//! Operating a consumer's dead-letter queue: list, show, replay, skip, purge.
//!
//! Dead letters sit in `<group>.dlq` (see [`crate::consumer`]). Every
//! operation is one pass over the queue: each message is taken, then either
//! copied to the back of the queue unchanged (kept), sent back to the
//! consumer (replayed), or dropped (skipped), and acknowledged only after
//! the broker confirmed the copy. Listing and showing keep every message, so
//! the queue holds the same messages in the same order afterwards; no
//! message is ever handed back unacknowledged, which a quorum queue would
//! count as a delivery (RabbitMQ 4 drops a message after 20 by default). A
//! pass cut short (the connection lost mid-way) may leave a message twice,
//! which is harmless: replayed twice, the second is a duplicate. Run one pass
//! at a time per queue.
//!
//! Replay sends the selected messages back through the group's exchange
//! (`<group>.partitions`), whose `partition` header routing takes each to its
//! own partition queue, so only the consumer that failed sees them again
//! (other queues bound to the producer's exchange already have them); their
//! original exchange and routing key stay in the headers, their attempt
//! count starts over. Applied, a dead letter releases the events of its
//! aggregate that were parked behind it ([`crate::sequence`]).
//!
//! Kept messages go back through the group's `<group>.queues` exchange,
//! never the default one, and every copy carries the `user_id` of the
//! connection's user ([`crate::wire::sent_by`]). So the dead-letter tools
//! need only: read on `<group>.dlq`, write on `<group>.queues` and
//! `<group>.partitions`, nothing else (the user `shop-dlq` of
//! `deploy/rabbitmq/definitions.json`).

use std::collections::BTreeMap;

/// What the dead-letter commands may do in the consumer's database (the
/// text of `shared/messaging/src/dlq_grants.sql`), granted by the
/// consumer's migrator to the role `DLQ_DATABASE_ROLE` names
/// ([`shop_database::Grant`]).
pub const DATABASE_GRANTS: &str = include_str!("dlq_grants.sql");

use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

use diesel_async::AsyncPgConnection;

use crate::AmqpConfig;
use crate::sequence::{self, Aggregate};
use crate::topology::{dead_letter_queue, queues_exchange};
use crate::wire::{self, header_i64, header_str};

/// One dead letter, as read from the queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// AMQP `message_id` (the event id), if any.
    pub message_id: Option<String>,
    /// AMQP `type`, if any.
    pub type_name: Option<String>,
    /// `dead_letter_reason`, or the broker's own reason (`x-first-death-reason`)
    /// for messages the broker dead-lettered.
    pub reason: String,
    /// `dead_letter_error`.
    pub error: Option<String>,
    /// `dead_letter_attempts`.
    pub attempts: Option<i64>,
    /// `original_exchange`.
    pub original_exchange: Option<String>,
    /// `original_routing_key`.
    pub original_routing_key: Option<String>,
    /// `dead_lettered_at`.
    pub dead_lettered_at: Option<String>,
    /// The aggregate and version it is sequenced by, if any.
    pub sequenced: Option<(crate::sequence::Aggregate, i64)>,
    /// Every header, rendered as text.
    pub headers: BTreeMap<String, String>,
    /// The body, untouched.
    pub body: Vec<u8>,
}

impl DeadLetter {
    fn from_properties(properties: &BasicProperties, body: &[u8]) -> Self {
        let empty = FieldTable::default();
        let headers = properties.headers().as_ref().unwrap_or(&empty);
        let text = |key: &str| header_str(headers, key).map(str::to_owned);
        Self {
            message_id: properties.message_id().as_ref().map(|id| id.to_string()),
            type_name: properties.kind().as_ref().map(|kind| kind.to_string()),
            reason: text(wire::DEAD_LETTER_REASON)
                .or_else(|| text("x-first-death-reason").map(|r| format!("broker: {r}")))
                .unwrap_or_else(|| "unknown".to_owned()),
            error: text(wire::DEAD_LETTER_ERROR),
            attempts: header_i64(headers, wire::DEAD_LETTER_ATTEMPTS),
            original_exchange: text(wire::ORIGINAL_EXCHANGE),
            original_routing_key: text(wire::ORIGINAL_ROUTING_KEY),
            dead_lettered_at: text(wire::DEAD_LETTERED_AT),
            sequenced: crate::sequence::sequenced_by(headers),
            headers: headers
                .inner()
                .iter()
                .map(|(key, value)| (key.to_string(), render(value)))
                .collect(),
            body: body.to_vec(),
        }
    }
}

fn render(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(text) => String::from_utf8_lossy(text.as_bytes()).into_owned(),
        AMQPValue::ShortString(text) => text.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// Which dead letters a replay takes; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only this reason (`max-attempts`, `undecodable`, …).
    pub reason: Option<String>,
    /// Only this AMQP `type`.
    pub type_name: Option<String>,
    /// Only this message id.
    pub message_id: Option<String>,
}

impl Selection {
    fn matches(&self, letter: &DeadLetter) -> bool {
        self.reason.as_ref().is_none_or(|r| *r == letter.reason)
            && self
                .type_name
                .as_ref()
                .is_none_or(|t| Some(t) == letter.type_name.as_ref())
            && self
                .message_id
                .as_ref()
                .is_none_or(|m| Some(m) == letter.message_id.as_ref())
    }
}

/// Counts of a dead-letter queue.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Messages in the queue.
    pub count: usize,
    /// Messages per reason.
    pub by_reason: BTreeMap<String, usize>,
    /// Messages per type.
    pub by_type: BTreeMap<String, usize>,
}

/// What a pass does with one dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Copied to the back of the queue.
    Keep,
    /// Sent back to the consumer.
    Replay,
    /// Removed.
    Drop,
}

impl Summary {
    /// The counts of `letters`.
    pub fn of(letters: &[DeadLetter]) -> Self {
        let mut summary = Self {
            count: letters.len(),
            ..Self::default()
        };
        for letter in letters {
            *summary.by_reason.entry(letter.reason.clone()).or_default() += 1;
            *summary
                .by_type
                .entry(letter.type_name.clone().unwrap_or_else(|| "(none)".to_owned()))
                .or_default() += 1;
        }
        summary
    }
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    /// Sent back to the consumer's queue.
    pub replayed: usize,
    /// Not selected, left in the dead-letter queue.
    pub kept: usize,
}

/// What [`DeadLetters::skip`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Dead letters removed from the queue.
    pub removed: usize,
    /// Parked events released behind it (sent back to the consumer).
    pub released: usize,
}

/// What [`DeadLetters::release`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Released {
    /// The aggregate's position before.
    pub from_version: i64,
    /// The last version given up on: its position now.
    pub through_version: i64,
    /// Parked events released (sent back to the consumer).
    pub released: usize,
}

/// The dead-letter queue of one consumer queue.
#[derive(Debug)]
pub struct DeadLetters {
    connection: Connection,
    queue: String,
    dead_letter_queue: String,
    /// The broker user of the connection, the `user_id` of every copy.
    user: String,
}

impl DeadLetters {
    /// Connects to the dead-letter queue of consumer queue `queue` (e.g.
    /// `order-service.user-events`).
    pub async fn connect(amqp: &AmqpConfig, queue: &str) -> anyhow::Result<Self> {
        let connection = crate::connection::connect(amqp, &format!("{queue} dead letters")).await?;
        Ok(Self {
            connection,
            queue: queue.to_owned(),
            dead_letter_queue: dead_letter_queue(queue),
            user: amqp.user(),
        })
    }

    /// The dead-letter queue's name.
    pub fn name(&self) -> &str {
        &self.dead_letter_queue
    }

    async fn count(&self, channel: &Channel) -> anyhow::Result<u32> {
        let queue = channel
            .queue_declare(
                self.dead_letter_queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|error| {
                anyhow::anyhow!("dead-letter queue {} not found: {error}", self.dead_letter_queue)
            })?;
        Ok(queue.message_count())
    }

    /// One pass over the queue (see the module docs): `choose` says what
    /// happens to each dead letter, oldest first.
    async fn pass(
        &self,
        mut choose: impl FnMut(&DeadLetter) -> Fate,
    ) -> anyhow::Result<Vec<(DeadLetter, Fate)>> {
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions { nowait: false })
            .await?;
        let count = self.count(&channel).await?;
        let router = crate::topology::router(&self.queue);
        let by_name = queues_exchange(&self.queue);
        let mut seen = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let Some(message) = self.get(&channel).await? else {
                break;
            };
            let delivery = &message.delivery;
            let letter = DeadLetter::from_properties(&delivery.properties, &delivery.data);
            let fate = choose(&letter);
            match fate {
                Fate::Keep => {
                    publish_confirmed(
                        &channel,
                        &by_name,
                        &self.dead_letter_queue,
                        &delivery.data,
                        wire::sent_by(delivery.properties.clone(), &self.user),
                    )
                    .await?;
                }
                Fate::Replay => {
                    let mut headers = FieldTable::default();
                    for (key, value) in delivery.properties.headers().clone().unwrap_or_default().inner() {
                        if !is_dead_letter_header(key.as_str()) {
                            headers.insert(key.clone(), value.clone());
                        }
                    }
                    if header_i64(&headers, wire::PARTITION).is_none()
                        && let Some(aggregate_id) = header_str(&headers, wire::AGGREGATE_ID)
                    {
                        let partition = wire::partition_of(aggregate_id);
                        headers.insert(wire::PARTITION.into(), AMQPValue::ShortInt(partition));
                    }
                    let properties =
                        wire::sent_by(delivery.properties.clone().with_headers(headers), &self.user);
                    publish_confirmed(&channel, &router, "", &delivery.data, properties).await?;
                }
                Fate::Drop => {}
            }
            delivery.acker.ack(BasicAckOptions { multiple: false }).await?;
            seen.push((letter, fate));
        }
        let _ = channel.close(200, "pass done".into()).await;
        Ok(seen)
    }

    /// Every dead letter, oldest first, left in the queue.
    pub async fn browse(&self) -> anyhow::Result<Vec<DeadLetter>> {
        Ok(self
            .pass(|_| Fate::Keep)
            .await?
            .into_iter()
            .map(|(letter, _)| letter)
            .collect())
    }

    /// Counts per reason and type.
    pub async fn summary(&self) -> anyhow::Result<Summary> {
        Ok(Summary::of(&self.browse().await?))
    }

    /// The dead letter with this message id, if it is in the queue.
    pub async fn show(&self, message_id: &str) -> anyhow::Result<Option<DeadLetter>> {
        Ok(self
            .browse()
            .await?
            .into_iter()
            .find(|letter| letter.message_id.as_deref() == Some(message_id)))
    }

    /// Sends the selected dead letters back to the consumer and keeps the
    /// others (see the module docs).
    pub async fn replay(&self, selection: &Selection) -> anyhow::Result<ReplayOutcome> {
        let seen = self
            .pass(|letter| {
                if selection.matches(letter) {
                    Fate::Replay
                } else {
                    Fate::Keep
                }
            })
            .await?;
        let replayed = seen.iter().filter(|(_, fate)| *fate == Fate::Replay).count();
        Ok(ReplayOutcome {
            replayed,
            kept: seen.len() - replayed,
        })
    }

    /// Removes the dead letters with this message id (normally one) and
    /// returns them.
    pub async fn take(&self, message_id: &str) -> anyhow::Result<Vec<DeadLetter>> {
        Ok(self
            .pass(|letter| {
                if letter.message_id.as_deref() == Some(message_id) {
                    Fate::Drop
                } else {
                    Fate::Keep
                }
            })
            .await?
            .into_iter()
            .filter(|(_, fate)| *fate == Fate::Drop)
            .map(|(letter, _)| letter)
            .collect())
    }

    /// Sends released parked events back to the consumer (see
    /// [`crate::sequence::release`]).
    pub async fn send_back(&self, events: &[crate::sequence::ParkedEvent]) -> anyhow::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions { nowait: false })
            .await?;
        crate::sequence::send_back(&channel, &crate::topology::router(&self.queue), events).await?;
        let _ = channel.close(200, "sent back".into()).await;
        Ok(())
    }

    /// Skips dead letter `message_id` (`shop dlq skip`): its aggregate
    /// gives up on its version (the position moves past it, in the
    /// consumer's database on `conn`), the events parked behind it are
    /// released and sent back, and it is removed from the queue.
    ///
    /// A dead letter that is no longer in the queue (purged by hand, lost
    /// with the queue) is skipped all the same when an aggregate waits on
    /// it: the position that records it names the aggregate and version.
    pub async fn skip(&self, conn: &mut AsyncPgConnection, message_id: &str) -> anyhow::Result<Skipped> {
        let letter = self.show(message_id).await?;
        let sequenced = match &letter {
            Some(letter) => letter.sequenced.clone(),
            None => {
                let holder = match uuid::Uuid::try_parse(message_id) {
                    Ok(event_id) => sequence::held_by_dead_letter(conn, &self.queue, event_id).await?,
                    Err(_) => None,
                };
                let Some(holder) = holder else {
                    anyhow::bail!(
                        "no dead letter with message id {message_id} in {}, and no aggregate waits on one",
                        self.dead_letter_queue
                    );
                };
                Some(holder)
            }
        };
        let mut released = 0;
        if let Some((aggregate, version)) = &sequenced {
            let position = sequence::position(conn, &self.queue, aggregate).await?;
            anyhow::ensure!(
                position.last_version >= version - 1,
                "{aggregate} is at version {}: versions {} to {} are missing too; \
                 `shop dlq release {aggregate}` gives up on them all",
                position.last_version,
                position.last_version + 1,
                version - 1
            );
            let (_, events) = sequence::release(conn, &self.queue, aggregate, *version).await?;
            self.send_back_recorded(conn, &events).await?;
            released = events.len();
        }
        let removed = if letter.is_some() {
            self.take(message_id).await?.len()
        } else {
            0
        };
        Ok(Skipped { removed, released })
    }

    /// Gives up on the versions `aggregate`'s parked events wait for (`shop
    /// dlq release`): its position moves to just before the first parked
    /// one, which is released and sent back.
    ///
    /// - A dead letter that holds the aggregate and is still in the queue
    ///   is refused (replay or skip it: that is a decision about the event).
    ///   One that is gone (purged by hand, lost with the queue) is given up
    ///   with the rest, also when nothing is parked behind it yet.
    /// - When the first parked event is already next in line (sent back
    ///   once, and that copy never came back), nothing is given up: it is
    ///   sent again.
    pub async fn release(
        &self,
        conn: &mut AsyncPgConnection,
        aggregate: &Aggregate,
    ) -> anyhow::Result<Released> {
        let held = sequence::held(conn, &self.queue)
            .await?
            .into_iter()
            .find(|held| held.aggregate == *aggregate);
        let position = match &held {
            Some(held) => held.position,
            None => sequence::position(conn, &self.queue, aggregate).await?,
        };
        if let Some((event, version)) = position.dead_letter
            && self.show(&event.to_string()).await?.is_some()
        {
            anyhow::bail!(
                "{aggregate} waits for dead letter {event} (version {version}): `shop dlq replay --message-id {event}` or `shop dlq skip {event}`"
            );
        }
        let first = held
            .as_ref()
            .and_then(|held| held.parked.first())
            .map(|p| p.version);
        let through = match (first, position.dead_letter) {
            (Some(first), _) => first - 1,
            // A lost dead letter with nothing behind it yet.
            (None, Some((_, version))) => version,
            (None, None) => anyhow::bail!("{aggregate} has no parked events"),
        };
        let events = if through <= position.last_version {
            sequence::release_next(conn, &self.queue, aggregate).await?
        } else {
            sequence::release(conn, &self.queue, aggregate, through).await?.1
        };
        self.send_back_recorded(conn, &events).await?;
        Ok(Released {
            from_version: position.last_version,
            through_version: through.max(position.last_version),
            released: events.len(),
        })
    }

    /// [`Self::send_back`], then records them as sent
    /// ([`sequence::mark_sent`]).
    async fn send_back_recorded(
        &self,
        conn: &mut AsyncPgConnection,
        events: &[sequence::ParkedEvent],
    ) -> anyhow::Result<()> {
        self.send_back(events).await?;
        sequence::mark_sent(conn, &self.queue, events).await?;
        Ok(())
    }

    /// Deletes every dead letter (`shop dlq purge`), unless an aggregate
    /// waits on one of them: then nothing is deleted, and the error names
    /// each such aggregate and dead letter, to replay or skip first.
    ///
    /// Refusing was chosen over deleting and marking the positions it
    /// strands: a purged letter takes the event with it, and what the
    /// aggregate does without it (give the version up, replay it, wait for
    /// the producer) is a decision about that event, made with it in
    /// hand. Letters that hold nothing go as before. A dead letter that
    /// arrives between the check and the purge is deleted unchecked:
    /// [`Self::skip`] and [`Self::release`] free its aggregate without it.
    pub async fn purge_unless_held(&self, conn: &mut AsyncPgConnection) -> anyhow::Result<u32> {
        let in_queue: std::collections::HashSet<String> = self
            .browse()
            .await?
            .into_iter()
            .filter_map(|letter| letter.message_id)
            .collect();
        let stranded: Vec<(Aggregate, uuid::Uuid, i64)> = sequence::dead_letter_holds(conn, &self.queue)
            .await?
            .into_iter()
            .filter(|(_, event, _)| in_queue.contains(&event.to_string()))
            .collect();
        if !stranded.is_empty() {
            const LISTED: usize = 20;
            let mut named: Vec<String> = stranded
                .iter()
                .take(LISTED)
                .map(|(aggregate, event, version)| {
                    format!("{aggregate} waits on {event} (version {version})")
                })
                .collect();
            if stranded.len() > LISTED {
                named.push(format!("and {} more", stranded.len() - LISTED));
            }
            anyhow::bail!(
                "purge refused: {} aggregate(s) wait on dead letters it would delete ({}); \
                 replay (`shop dlq replay --message-id ID`) or skip (`shop dlq skip ID`) each, then purge",
                stranded.len(),
                named.join("; ")
            );
        }
        self.purge().await
    }

    /// Deletes every dead letter; returns how many.
    pub async fn purge(&self) -> anyhow::Result<u32> {
        let channel = self.connection.create_channel().await?;
        self.count(&channel).await?;
        let purged = channel
            .queue_purge(
                self.dead_letter_queue.as_str().into(),
                QueuePurgeOptions { nowait: false },
            )
            .await?;
        let _ = channel.close(200, "purged".into()).await;
        Ok(purged)
    }

    async fn get(&self, channel: &Channel) -> anyhow::Result<Option<BasicGetMessage>> {
        Ok(channel
            .basic_get(
                self.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?)
    }

    /// Closes the connection.
    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Headers a replayed message sheds: it starts over as a fresh delivery.
fn is_dead_letter_header(key: &str) -> bool {
    key.starts_with("dead_letter")
        || key.starts_with("x-death")
        || key.starts_with("x-first-death")
        || key.starts_with("x-last-death")
        || [wire::ATTEMPT, wire::LAST_ERROR, wire::ORIGINAL_QUEUE].contains(&key)
}

async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> anyhow::Result<()> {
    let confirm = channel
        .basic_publish(
            ShortString::from(exchange),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            properties,
        )
        .await?
        .await?;
    match confirm {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) => anyhow::bail!("no queue takes the message ({exchange:?} {queue:?})"),
        Confirmation::Nack(_) => anyhow::bail!("the broker refused the message ({exchange:?} {queue:?})"),
    }
}
