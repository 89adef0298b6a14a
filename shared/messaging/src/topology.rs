//! Every exchange and queue the system declares, in one place.
//!
//! Declarations are idempotent: each service declares what it publishes to
//! and consumes from at start-up and after every reconnect, so a fresh
//! broker (or one that lost its definitions) is set up without a separate
//! step. The options are the same everywhere a name is declared; declaring an
//! existing name with other options is a channel error, which is why they
//! live here only.
//!
//! # Who declares what
//!
//! A producer declares its own topic exchange ([`declare_event_exchange`]);
//! a consumer group declares its own exchanges and queues, all named after
//! the group, and only looks the producer's exchange up
//! ([`ensure_event_exchange`]): a consumer may read from the producer's
//! exchange, never configure it. So each service's broker user needs the
//! configure permission on its own names only (see
//! `shared/messaging/broker/definitions.json`); the producer's exchange exists once
//! its producer has started, or from the broker's definitions (compose and
//! Kubernetes create both event exchanges up front). Until it exists the
//! consumer waits, reconnecting with backoff, as for any outage.
//!
//! Nothing here publishes to the default exchange: a user allowed to write
//! to it can put a message into any queue of the virtual host. What the
//! group sends to its own queues by name (retries, dead letters, and the
//! broker's own dead-lettering of a partition queue) goes through the
//! group's direct exchange `<group>.queues` instead ([`ConsumerTopology::queues_exchange`]),
//! bound to exactly those queues.
//!
//! # A consumer group: partitions
//!
//! A consumer group (the queue name its replicas share, e.g.
//! `order-service.user-events`) receives the producer's events on
//! [`ConsumerTopology::partitions`] partition queues. The relay stamps every
//! event with its partition (a stable hash of its aggregate id into `0..32`,
//! [`crate::wire::partition_of`]) twice: as the `partition` header and as the
//! routing key `partition.<k>` in the `CC` header. The group's direct
//! exchange routes key `partition.<k>` to partition queue `k % partitions`;
//! what carries no such key goes on to the group's headers exchange, which
//! routes by the `partition` header, and what carries neither lands on
//! partition 0:
//!
//! ```text
//! user.events ──routing keys──► <group>.route ──CC partition.k──► <group>.ordered.<k % P> ──► one active consumer
//!  (topic)                       (direct)  └─alternate─► <group>.partitions ──partition=k──► <group>.ordered.<k % P>
//!                                                          (headers)    └─alternate─► <group>.unpartitioned ──► <group>.ordered.0
//!
//! <group>.ordered.<i> ──handler fails──► <group>.queues ──► <group>.delay.<ms> (TTL) ──► <group>.partitions (back to its partition)
//! <group>.ordered.<i> ──never succeeds / N attempts / N crashes──► <group>.queues ──► <group>.dlq
//! ```
//!
//! Why exchanges fed by the relay's hash, not the consistent-hash exchange:
//! that exchange is a plugin an operator has to enable on every node, and
//! its ring would hash again what the outbox already partitions (the relay
//! claims the same 32 partitions); the direct and headers exchanges are
//! built in, and the mapping `k % P` is visible in the bindings. Why two:
//! every event passes the direct exchange, one table lookup; a headers
//! exchange compares each message with every one of its 32 bindings, which
//! halved the broker's publishing rate. The headers exchange stays for what
//! the group sends itself (retries, replays, released parked events: rare,
//! and dead-lettering keeps the delay queue's target fixed) and for events of
//! producers that do not set `CC`. Every partition queue is a quorum queue
//! with `x-single-active-consumer`, so even while replicas hand partitions
//! over, one consumer at a time takes from it.
//!
//! # The broker's delivery limit
//!
//! A quorum queue counts the returns of each message and dead-letters it
//! past its `x-delivery-limit`. That is no poison rule for a partition
//! queue: before RabbitMQ 4.3 every return counts (4.3 and later still
//! count a closed channel), and hand-overs, self-fencing replicas and
//! restarts return the whole prefetch, so innocent events would be
//! dead-lettered, without the headers and the hold on their aggregate's
//! later events the consumer's own dead letters have. An absent limit is
//! none on 3.x but 20 on 4.x (also for queues declared before the
//! upgrade); `-1` is none on 4.x but 0 on 3.x. So partition queues carry
//! [`PARTITION_QUEUE_DELIVERY_LIMIT`], the largest the argument takes,
//! the same on both and never reached; the consumer counts the handlings a
//! crash ended itself ([`crate::consumer`]). See `docs/consumer.md`.
//!
//! Changing the number of partitions re-binds the queues at the next start;
//! messages of queues beyond the new count are moved back through the
//! group's exchange (see [`ConsumerTopology::retire`]). Change it with every
//! replica stopped: replicas with different counts would re-bind the queues
//! back and forth. Ordering holds either way, as the consumer's sequencing
//! does not depend on the routing ([`crate::sequence`]).
//!
//! # Layouts retired
//!
//! A queue's arguments cannot change once it exists, so a layout that needs
//! other arguments gets new queue names, and [`ConsumerTopology::retire`]
//! moves the messages of the old ones over at every start:
//!
//! - `<group>` and `<group>.retry.<ms>ms`: the single queue before
//!   partitions;
//! - `<group>.p<i>`: partition queues that dead-lettered through the default
//!   exchange, which every consumer's user then had to be allowed to write
//!   to (replaced by `<group>.partition.<i>`, dead-lettering through
//!   `<group>.queues`);
//! - `<group>.partition.<i>`: partition queues with a broker delivery limit
//!   of 20, which hand-overs used up (replaced by `<group>.ordered.<i>`;
//!   see above).

use std::time::Duration;

use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, ExchangeUnbindOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation, Connection, ExchangeKind};

use crate::wire::{self, PARTITIONS};

/// Declares the topic exchange a service publishes its events to
/// (`user.events`, `order.events`): by its producer, which owns it.
pub async fn declare_event_exchange(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    declare_exchange(channel, exchange, ExchangeKind::Topic, FieldTable::default()).await
}

/// Checks that another service's event exchange exists, without declaring it
/// (a passive declare, which needs no permission on it). A missing exchange
/// closes `channel` with `NOT_FOUND`.
pub async fn ensure_event_exchange(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                // Only look: the producer (or the broker's definitions)
                // creates it, with its own options.
                passive: true,
                durable: true,
                auto_delete: false,
                internal: false,
                nowait: false,
            },
            FieldTable::default(),
        )
        .await
}

async fn declare_exchange(
    channel: &Channel,
    exchange: &str,
    kind: ExchangeKind,
    args: FieldTable,
) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            kind,
            ExchangeDeclareOptions {
                // Only check that it exists: no, create it when missing.
                passive: false,
                // Survives a broker restart.
                durable: true,
                // Stays when nothing is bound: events of a producer without
                // consumers are returned (or dropped), not an error.
                auto_delete: false,
                // Publishers (the relay, the dead-letter tooling) use it
                // directly.
                internal: false,
                // Wait for declare-ok so errors surface here.
                nowait: false,
            },
            args,
        )
        .await
}

/// The exchanges and queues of one consumer group; see the module docs.
#[derive(Debug, Clone)]
pub struct ConsumerTopology {
    /// The producer's topic exchange.
    pub exchange: String,
    /// The group's name, shared by all its replicas, e.g.
    /// `order-service.user-events`: every name below starts with it.
    pub queue: String,
    /// Routing keys bound from the producer's exchange.
    pub routing_keys: Vec<String>,
    /// One delay queue per entry.
    pub retry_delays: Vec<Duration>,
    /// Partition queues, 1 to 32.
    pub partitions: u16,
}

impl ConsumerTopology {
    /// The number of partition queues, clamped to 1..=32.
    pub fn partition_count(&self) -> u16 {
        self.partitions.clamp(1, PARTITIONS.unsigned_abs())
    }

    /// Name of partition queue `index`: `<group>.ordered.<index>`.
    pub fn partition_queue(&self, index: u16) -> String {
        format!("{}.ordered.{index}", self.queue)
    }

    /// The partition queue that receives events of wire partition
    /// `partition` (the `partition` header).
    pub fn queue_of(&self, partition: i16) -> u16 {
        partition.unsigned_abs() % self.partition_count()
    }

    /// The group's headers exchange, which routes by the `partition` header:
    /// `<group>.partitions`. Replays and retries go back through it.
    pub fn router(&self) -> String {
        router(&self.queue)
    }

    /// The group's direct exchange, bound to the producer's exchange, which
    /// routes by the `partition.<k>` routing key the relay puts in the `CC`
    /// header: `<group>.route`. What it cannot route goes on to
    /// [`Self::router`].
    pub fn route(&self) -> String {
        format!("{}.route", self.queue)
    }

    /// The fanout exchange that takes what carries no `partition` header:
    /// `<group>.unpartitioned`, bound to partition 0.
    pub fn unpartitioned(&self) -> String {
        format!("{}.unpartitioned", self.queue)
    }

    /// Name of the delay queue for retry step `step` (0-based).
    pub fn retry_queue(&self, step: usize) -> String {
        let delay = self.retry_delays.get(step).copied().unwrap_or_default();
        format!("{}.delay.{}ms", self.queue, delay.as_millis())
    }

    /// Name of the dead-letter queue.
    pub fn dead_letter_queue(&self) -> String {
        dead_letter_queue(&self.queue)
    }

    /// The group's direct exchange to its own queues by their names,
    /// `<group>.queues`: what the default exchange would do, for the delay
    /// queues and the dead-letter queue only. Retries, dead letters and the
    /// partition queues' own dead-lettering go through it.
    pub fn queues_exchange(&self) -> String {
        queues_exchange(&self.queue)
    }

    /// Every queue this topology declares (for tooling and test clean-up).
    pub fn queue_names(&self) -> Vec<String> {
        let mut names: Vec<String> = (0..self.partition_count())
            .map(|index| self.partition_queue(index))
            .collect();
        names.push(self.dead_letter_queue());
        names.extend((0..self.retry_delays.len()).map(|step| self.retry_queue(step)));
        names
    }

    /// Every exchange of the group itself (not the producer's), for
    /// clean-up.
    pub fn exchange_names(&self) -> Vec<String> {
        vec![
            self.route(),
            self.router(),
            self.unpartitioned(),
            self.queues_exchange(),
        ]
    }

    /// Declares the group's exchanges, queues and bindings, after checking
    /// that the producer's exchange exists (it is not the group's to
    /// declare: see the module docs). Idempotent.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        ensure_event_exchange(channel, &self.exchange).await?;
        declare_exchange(
            channel,
            &self.queues_exchange(),
            ExchangeKind::Direct,
            FieldTable::default(),
        )
        .await?;
        // The dead-letter queue: where messages that can never succeed wait
        // for a person (list, replay, skip, purge).
        declare_quorum_queue(channel, &self.dead_letter_queue(), FieldTable::default()).await?;
        bind_by_name(channel, &self.dead_letter_queue(), &self.queues_exchange()).await?;

        declare_exchange(
            channel,
            &self.unpartitioned(),
            ExchangeKind::Fanout,
            FieldTable::default(),
        )
        .await?;
        let mut router_args = FieldTable::default();
        router_args.insert(
            "alternate-exchange".into(),
            wire::long_string(&self.unpartitioned()),
        );
        declare_exchange(
            channel,
            &self.router(),
            ExchangeKind::Custom("headers".into()),
            router_args,
        )
        .await?;
        let mut route_args = FieldTable::default();
        route_args.insert("alternate-exchange".into(), wire::long_string(&self.router()));
        declare_exchange(channel, &self.route(), ExchangeKind::Direct, route_args).await?;

        for index in 0..self.partition_count() {
            let queue = self.partition_queue(index);
            declare_quorum_queue(channel, &queue, self.partition_queue_args()).await?;
            for partition in 0..PARTITIONS {
                let bound = self.queue_of(partition) == index;
                bind_or_unbind(
                    channel,
                    &queue,
                    &self.router(),
                    "",
                    partition_binding(partition),
                    bound,
                )
                .await?;
                bind_or_unbind(
                    channel,
                    &queue,
                    &self.route(),
                    &wire::partition_routing_key(partition),
                    FieldTable::default(),
                    bound,
                )
                .await?;
            }
        }
        channel
            .queue_bind(
                self.partition_queue(0).as_str().into(),
                self.unpartitioned().as_str().into(),
                "".into(),
                QueueBindOptions { nowait: false },
                FieldTable::default(),
            )
            .await?;
        for key in &self.routing_keys {
            channel
                .exchange_bind(
                    self.route().as_str().into(),
                    self.exchange.as_str().into(),
                    key.as_str().into(),
                    ExchangeBindOptions { nowait: false },
                    FieldTable::default(),
                )
                .await?;
            // Before the direct exchange, the producer's exchange fed the
            // headers exchange; left bound, every event would still pay
            // the headers exchange's comparisons (the broker delivers one
            // copy per queue either way).
            channel
                .exchange_unbind(
                    self.router().as_str().into(),
                    self.exchange.as_str().into(),
                    key.as_str().into(),
                    ExchangeUnbindOptions { nowait: false },
                    FieldTable::default(),
                )
                .await?;
        }

        // Delay queues: nobody consumes them; a message waits out the TTL and
        // is dead-lettered to the group's exchange, whose `partition` header
        // routing takes it back to its own partition queue.
        for (step, delay) in self.retry_delays.iter().enumerate() {
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            args.insert("x-dead-letter-exchange".into(), wire::long_string(&self.router()));
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            declare_quorum_queue(channel, &self.retry_queue(step), args).await?;
            bind_by_name(channel, &self.retry_queue(step), &self.queues_exchange()).await?;
        }
        Ok(())
    }

    /// The arguments of a partition queue.
    pub fn partition_queue_args(&self) -> FieldTable {
        // Whatever the broker itself dead-letters goes to the dead-letter
        // queue too, at least once, through the group's own exchange (not
        // the default one: see the module docs). Nothing should get there
        // (see `x-delivery-limit` below); it is where a message would land
        // if an operator's policy set a limit anyway.
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            wire::long_string(&self.queues_exchange()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            wire::long_string(&self.dead_letter_queue()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        // The broker's delivery limit is no poison rule here: every return
        // counts towards it (a hand-over, a self-fencing replica, a crash
        // all return the whole prefetch), so it would dead-letter innocent
        // events. A limit no message reaches, the same on RabbitMQ 3.x
        // (where an absent limit is none, but a negative one is 0) and 4.x
        // (where an absent limit is 20): see the module docs. The consumer
        // counts the handlings a crash ended itself
        // ([`crate::consumer`], `inbox_crashes`).
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(PARTITION_QUEUE_DELIVERY_LIMIT),
        );
        // One consumer at a time takes from a partition, whatever the
        // number of replicas.
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        args
    }

    /// Moves the messages of queues this group no longer uses back through
    /// the group's exchange and deletes those queues: the layouts retired
    /// (see the module docs: the single queue before partitions, `<group>`
    /// and its delay queues `<group>.retry.<ms>ms`; the partition queues
    /// `<group>.p<i>` that dead-lettered through the default exchange; the
    /// partition queues `<group>.partition.<i>` with a delivery limit of
    /// 20), and partition queues beyond the current count. Each message is
    /// re-published with its `partition` header (set from its aggregate id
    /// when missing) and `user_id` set to `user`, the connection's (the
    /// broker refuses any other), confirmed, then acknowledged. Returns how
    /// many messages moved.
    ///
    /// A queue a replica of the old layout still consumes from is left for
    /// a later start (it is deleted only when empty).
    pub async fn retire(&self, connection: &Connection, user: &str) -> anyhow::Result<usize> {
        let mut retired: Vec<String> = self
            .retry_delays
            .iter()
            .map(|delay| format!("{}.retry.{}ms", self.queue, delay.as_millis()))
            .collect();
        retired.push(self.queue.clone());
        retired.extend((0..PARTITIONS.unsigned_abs()).map(|index| format!("{}.p{index}", self.queue)));
        retired
            .extend((0..PARTITIONS.unsigned_abs()).map(|index| format!("{}.partition.{index}", self.queue)));
        retired.extend(
            (self.partition_count()..PARTITIONS.unsigned_abs()).map(|index| self.partition_queue(index)),
        );
        let mut moved = 0;
        for queue in retired {
            // A passive declare of a missing queue closes the channel: one
            // channel per look.
            let probe = connection.create_channel().await?;
            let exists = probe
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .is_ok();
            if probe.status().connected() {
                let _ = probe.close(200, "probed".into()).await;
            }
            if !exists {
                continue;
            }
            moved += self.drain(connection, &queue, user).await?;
        }
        Ok(moved)
    }

    /// Unbinds `queue`, moves its messages to the group's exchange (sent as
    /// `user`), and deletes it if it is empty.
    async fn drain(&self, connection: &Connection, queue: &str, user: &str) -> anyhow::Result<usize> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions { nowait: false })
            .await?;
        // No new messages: the layout before partitions bound the queue to
        // the producer's exchange; partition queues are bound to the router.
        for key in &self.routing_keys {
            channel
                .queue_unbind(
                    queue.into(),
                    self.exchange.as_str().into(),
                    key.as_str().into(),
                    FieldTable::default(),
                )
                .await?;
        }
        for partition in 0..PARTITIONS {
            channel
                .queue_unbind(
                    queue.into(),
                    self.router().as_str().into(),
                    "".into(),
                    partition_binding(partition),
                )
                .await?;
            channel
                .queue_unbind(
                    queue.into(),
                    self.route().as_str().into(),
                    wire::partition_routing_key(partition).as_str().into(),
                    FieldTable::default(),
                )
                .await?;
        }
        // `basic.get` is refused on a quorum queue with a single active
        // consumer (the partition queues): consume what is ready instead,
        // until it is all moved or nothing comes (a replica of the old
        // layout still active on it keeps its messages).
        let ready = look(&channel, queue).await?.message_count();
        let mut moved = 0;
        if ready > 0 {
            channel.basic_qos(200, BasicQosOptions { global: false }).await?;
            let tag = format!("{queue}.retiring");
            let mut messages = channel
                .basic_consume(
                    queue.into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            while moved < ready as usize {
                let delivery = match tokio::time::timeout(RETIRE_IDLE, messages.next()).await {
                    Ok(Some(delivery)) => delivery?,
                    Ok(None) | Err(_) => break,
                };
                self.move_to_router(&channel, queue, &delivery, user).await?;
                delivery.acker.ack(BasicAckOptions { multiple: false }).await?;
                moved += 1;
            }
            channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions { nowait: false })
                .await?;
        }
        // Quorum queues refuse `if-empty` and `if-unused` deletes (a hard
        // error that closes the connection): look first. Nothing routes to
        // the queue any more, so empty now stays empty; a replica of the old
        // layout still consuming it (its unacknowledged messages would be
        // lost) keeps it for a later start.
        let state = look(&channel, queue).await?;
        if state.message_count() == 0 && state.consumer_count() == 0 {
            channel
                .queue_delete(
                    queue.into(),
                    QueueDeleteOptions {
                        if_unused: false,
                        if_empty: false,
                        nowait: false,
                    },
                )
                .await?;
        } else {
            tracing::info!(
                queue,
                messages = state.message_count(),
                consumers = state.consumer_count(),
                "a retired queue is still in use; it is moved again at the next start"
            );
        }
        if channel.status().connected() {
            let _ = channel.close(200, "retired".into()).await;
        }
        if moved > 0 {
            tracing::info!(queue, moved, router = %self.router(), "moved the messages of a retired queue to the partitions");
        }
        Ok(moved)
    }

    /// Re-publishes `delivery` of retired `queue` to the group's router,
    /// with its `partition` header (set from its aggregate id when missing)
    /// and `user` as its `user_id`, and waits for the confirm.
    async fn move_to_router(
        &self,
        channel: &Channel,
        queue: &str,
        delivery: &lapin::message::Delivery,
        user: &str,
    ) -> anyhow::Result<()> {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        if wire::header_i64(&headers, wire::PARTITION).is_none()
            && let Some(aggregate_id) = wire::header_str(&headers, wire::AGGREGATE_ID)
        {
            let partition = wire::partition_of(aggregate_id);
            headers.insert(wire::PARTITION.into(), AMQPValue::ShortInt(partition));
        }
        let confirm = channel
            .basic_publish(
                self.router().as_str().into(),
                delivery.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &delivery.data,
                wire::sent_by(delivery.properties.clone().with_headers(headers), user),
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(_) => {
                anyhow::bail!("moving a message of {queue} to {} failed", self.router())
            }
        }
    }
}

/// Binds `queue` to `exchange` with `key` and `args`, or (`bound` false)
/// removes such a binding left over from another partition count;
/// unbinding what is not bound is not an error.
async fn bind_or_unbind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
    args: FieldTable,
    bound: bool,
) -> lapin::Result<()> {
    if bound {
        channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions { nowait: false },
                args,
            )
            .await
    } else {
        channel
            .queue_unbind(queue.into(), exchange.into(), key.into(), args)
            .await
    }
}

/// `queue` as the broker has it (messages ready, consumers), by a passive
/// declare: a missing queue closes `channel`.
async fn look(channel: &Channel, queue: &str) -> lapin::Result<lapin::Queue> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// Binds `queue` to the group's `<group>.queues` exchange by its own name.
async fn bind_by_name(channel: &Channel, queue: &str, exchange: &str) -> lapin::Result<()> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            queue.into(),
            QueueBindOptions { nowait: false },
            FieldTable::default(),
        )
        .await
}

/// The binding of wire partition `partition` on a group's headers exchange.
fn partition_binding(partition: i16) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-match".into(), AMQPValue::LongString("all".into()));
    args.insert(wire::PARTITION.into(), AMQPValue::ShortInt(partition));
    args
}

/// The headers exchange of consumer group `queue`.
pub fn router(queue: &str) -> String {
    format!("{queue}.partitions")
}

/// The dead-letter queue of consumer group `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// The direct exchange of consumer group `queue` to its delay queues and
/// its dead-letter queue by their names.
pub fn queues_exchange(queue: &str) -> String {
    format!("{queue}.queues")
}

/// How long moving a retired queue waits for its next message before it
/// leaves the rest for a later start (a replica of the old layout is still
/// the queue's active consumer).
const RETIRE_IDLE: Duration = Duration::from_secs(2);

/// The `x-delivery-limit` of a partition queue: the largest the argument
/// takes, which no message reaches (2^31 returns), so the broker never
/// dead-letters by it. Not absent (RabbitMQ 4 applies 20 then), not `-1`
/// (unlimited on RabbitMQ 4, but 0 on 3.x: dropped at the first return).
pub const PARTITION_QUEUE_DELIVERY_LIMIT: i32 = i32::MAX;

/// Declares a durable quorum queue (replicated across the nodes of a
/// cluster, and at-least-once in every dead-lettering step).
async fn declare_quorum_queue(channel: &Channel, name: &str, mut args: FieldTable) -> lapin::Result<()> {
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: false,
                // Quorum queues are always durable.
                durable: true,
                // Shared by every replica of the consumer.
                exclusive: false,
                // Kept when no consumer is connected: messages wait.
                auto_delete: false,
                nowait: false,
            },
            args,
        )
        .await
        .map(|_| ())
}
