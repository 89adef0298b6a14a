//! Every exchange and queue the system declares, in one place.
//!
//! Declarations are idempotent: each service declares what it publishes to
//! and consumes from at start-up and after every reconnect, so a fresh
//! broker (or one that lost its definitions) is set up without a separate
//! step. The options are the same everywhere a name is declared; declaring an
//! existing name with other options is a channel error, which is why they
//! live here only.

use lapin::Channel;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

/// Declares the topic exchange a service publishes its events to
/// (`user.events`, `order.events`).
pub async fn declare_event_exchange(channel: &Channel, exchange: &str) -> lapin::Result<()> {
    channel
        .exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                // Only check that it exists: no, create it when missing.
                passive: false,
                // Survives a broker restart.
                durable: true,
                // Stays when no queue is bound: events of a producer without
                // consumers are dropped by the broker, not an error.
                auto_delete: false,
                // Publishers use it directly.
                internal: false,
                // Wait for declare-ok so errors surface here.
                nowait: false,
            },
            FieldTable::default(),
        )
        .await
}

/// The queues of one consumer: the main queue bound to the producer's
/// exchange, one delay queue per retry step, and the dead-letter queue.
///
/// ```text
/// exchange ──routing keys──► <queue> ──handler fails──► <queue>.retry.<n> (TTL) ─┐
///                              ▲                                                 │
///                              └──────────── dead-lettered back after the TTL ───┘
///                            <queue> ──never succeeds / N attempts──► <queue>.dlq
/// ```
#[derive(Debug, Clone)]
pub struct ConsumerTopology {
    /// The producer's topic exchange.
    pub exchange: String,
    /// The consumer's queue, e.g. `order-service.user-events`.
    pub queue: String,
    /// Routing keys bound from the exchange to the queue.
    pub routing_keys: Vec<String>,
    /// One delay queue per entry.
    pub retry_delays: Vec<std::time::Duration>,
}

impl ConsumerTopology {
    /// Name of the delay queue for retry step `step` (0-based).
    pub fn retry_queue(&self, step: usize) -> String {
        let delay = self.retry_delays.get(step).copied().unwrap_or_default();
        format!("{}.retry.{}ms", self.queue, delay.as_millis())
    }

    /// Name of the dead-letter queue.
    pub fn dead_letter_queue(&self) -> String {
        dead_letter_queue(&self.queue)
    }

    /// Every queue this topology declares (for tooling and test clean-up).
    pub fn queue_names(&self) -> Vec<String> {
        let mut names = vec![self.queue.clone(), self.dead_letter_queue()];
        names.extend((0..self.retry_delays.len()).map(|step| self.retry_queue(step)));
        names
    }

    /// Declares the exchange, the queues and the bindings. Idempotent.
    pub async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        declare_event_exchange(channel, &self.exchange).await?;
        // The dead-letter queue: where messages that can never succeed wait
        // for a person (list, replay, purge).
        declare_quorum_queue(channel, &self.dead_letter_queue(), FieldTable::default()).await?;

        // The main queue. Whatever the broker itself dead-letters (a message
        // redelivered more than the delivery limit because it crashes every
        // consumer) goes to the dead-letter queue too, at least once.
        let mut main = FieldTable::default();
        main.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
        main.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.dead_letter_queue().as_str().into()),
        );
        main.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        main.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        main.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongInt(MAIN_QUEUE_DELIVERY_LIMIT),
        );
        declare_quorum_queue(channel, &self.queue, main).await?;
        for key in &self.routing_keys {
            channel
                .queue_bind(
                    self.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    key.as_str().into(),
                    QueueBindOptions { nowait: false },
                    FieldTable::default(),
                )
                .await?;
        }

        // Delay queues: nobody consumes them; a message waits out the TTL and
        // is dead-lettered back to the main queue through the default
        // exchange.
        for (step, delay) in self.retry_delays.iter().enumerate() {
            let mut args = FieldTable::default();
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
            );
            args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(self.queue.as_str().into()),
            );
            args.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            args.insert(
                "x-overflow".into(),
                AMQPValue::LongString("reject-publish".into()),
            );
            declare_quorum_queue(channel, &self.retry_queue(step), args).await?;
        }
        Ok(())
    }
}

/// The dead-letter queue of consumer queue `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// How many times the broker delivers a message of a main queue before it
/// dead-letters it itself: only a message that kills its consumer every time
/// gets there, since handler failures are retried through the delay queues.
pub const MAIN_QUEUE_DELIVERY_LIMIT: i32 = 20;

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
