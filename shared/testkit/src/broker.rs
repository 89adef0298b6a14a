//! A broker namespace per test.

use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt as _;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
use shop_messaging::AmqpConfig;

use crate::amqp_url;

/// A prefix for every exchange and queue one test uses, and the deletion of
/// the names it registered when it is dropped, so tests run in parallel on
/// one broker and leave nothing behind.
#[derive(Debug)]
pub struct TestBroker {
    prefix: String,
    exchanges: Mutex<Vec<String>>,
    queues: Mutex<Vec<String>>,
}

impl Default for TestBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl TestBroker {
    /// A new namespace.
    pub fn new() -> Self {
        Self {
            prefix: format!("t{}", crate::short_id()),
            exchanges: Mutex::new(Vec::new()),
            queues: Mutex::new(Vec::new()),
        }
    }

    /// Broker settings for a service under test.
    pub fn config(&self) -> AmqpConfig {
        AmqpConfig::new(amqp_url())
    }

    /// The prefixed name of exchange `base` (`user.events`), deleted at the
    /// end of the test.
    pub fn exchange(&self, base: &str) -> String {
        let name = format!("{}.{base}", self.prefix);
        push_unique(&self.exchanges, &name);
        name
    }

    /// The prefixed name of event exchange `base` (`user.events`), declared
    /// now on the broker of `amqp` as its producer declares it, and deleted
    /// at the end of the test. A consumer only looks its producer's
    /// exchange up, so a test that starts a consumer before the producer
    /// (or without one) declares the exchange first, as compose's and
    /// Kubernetes' broker definitions do.
    ///
    /// # Panics
    ///
    /// When the broker is unreachable or refuses the declaration.
    pub async fn event_exchange(&self, amqp: &AmqpConfig, base: &str) -> String {
        let name = self.exchange(base);
        let declared = async {
            let connection = shop_messaging::connection::connect(amqp, "test exchange").await?;
            let channel = connection.create_channel().await?;
            shop_messaging::topology::declare_event_exchange(&channel, &name).await?;
            let _ = connection.close(200, "declared".into()).await;
            anyhow::Ok(())
        };
        if let Err(error) = declared.await {
            panic!("declaring the test exchange {name}: {error:#}");
        }
        name
    }

    /// The prefixed name of queue `base`, deleted at the end of the test.
    pub fn queue(&self, base: &str) -> String {
        let name = format!("{}.{base}", self.prefix);
        self.track_queue(&name);
        name
    }

    /// Registers a queue declared under another name (derived queues such as
    /// retry and dead-letter queues) for deletion.
    pub fn track_queue(&self, name: &str) {
        push_unique(&self.queues, name);
    }

    /// Registers every queue and exchange of a consumer group for deletion.
    pub fn track_topology(&self, topology: &shop_messaging::topology::ConsumerTopology) {
        for queue in topology.queue_names() {
            self.track_queue(&queue);
        }
        for exchange in topology.exchange_names() {
            push_unique(&self.exchanges, &exchange);
        }
    }

    /// A queue bound to `exchange` with `binding_key` (`#` for all), declared
    /// now, so it sees every message published from here on.
    pub async fn probe(&self, exchange: &str, binding_key: &str) -> anyhow::Result<ProbeQueue> {
        ProbeQueue::bind(exchange, binding_key).await
    }
}

fn push_unique(names: &Mutex<Vec<String>>, name: &str) {
    let mut names = names.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if !names.iter().any(|n| n == name) {
        names.push(name.to_owned());
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let queues = std::mem::take(
            &mut *self
                .queues
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let exchanges = std::mem::take(
            &mut *self
                .exchanges
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        if queues.is_empty() && exchanges.is_empty() {
            return;
        }
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async move {
                let connection = Connection::connect(&amqp_url(), ConnectionProperties::default())
                    .await
                    .ok()?;
                for queue in queues {
                    // A channel per delete: deleting a missing queue is fine,
                    // but any channel error closes the channel.
                    let channel = connection.create_channel().await.ok()?;
                    let _ = channel
                        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                for exchange in exchanges {
                    let channel = connection.create_channel().await.ok()?;
                    let _ = channel
                        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
                let _ = connection.close(200, "test done".into()).await;
                Some(())
            })
        })
        .join();
    }
}

/// An exclusive queue that records what is published to an exchange; the
/// broker deletes it when its connection closes.
#[derive(Debug)]
pub struct ProbeQueue {
    connection: Connection,
    channel: Channel,
    consumer: Consumer,
    queue: String,
}

impl ProbeQueue {
    async fn bind(exchange: &str, binding_key: &str) -> anyhow::Result<Self> {
        let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        // Confirms, so the marker of `expect_nothing_more` is known to be
        // queued.
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await?;
        shop_messaging::topology::declare_event_exchange(&channel, exchange).await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.name().clone(),
                exchange.into(),
                binding_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "probe".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            connection,
            channel,
            consumer,
            queue: queue.name().to_string(),
        })
    }

    /// The next message, or `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Delivery> {
        let delivery = tokio::time::timeout(timeout, self.consumer.next())
            .await
            .ok()??
            .ok()?;
        let _ = delivery.ack(BasicAckOptions::default()).await;
        Some(delivery)
    }

    /// Exactly `count` messages (panics if they do not arrive within
    /// `timeout`), then [`Self::expect_nothing_more`].
    pub async fn expect(&mut self, count: usize, timeout: Duration) -> Vec<Delivery> {
        let until = tokio::time::Instant::now() + timeout;
        let mut received = Vec::with_capacity(count);
        while received.len() < count {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(delivery) => received.push(delivery),
                None => panic!(
                    "expected {count} messages within {timeout:?}, got {}",
                    received.len()
                ),
            }
        }
        self.expect_nothing_more().await;
        received
    }

    /// Checks that nothing more is in the queue, without waiting for a
    /// quiet spell: a marker is sent to the queue itself (through the
    /// default exchange) and must be the next message. Whatever was routed
    /// to the queue before the marker arrives before it, so a message that
    /// a producer had confirmed (or sent on a connection it has closed)
    /// before this call is caught however slow the machine. Call it once
    /// the producers are stopped, or have nothing left to send.
    pub async fn expect_nothing_more(&mut self) {
        let marker = format!("marker-{}", crate::short_id());
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                self.queue.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                b"",
                lapin::BasicProperties::default().with_message_id(marker.as_str().into()),
            )
            .await
            .unwrap_or_else(|error| panic!("publishing the marker: {error}"))
            .await
            .unwrap_or_else(|error| panic!("confirm of the marker: {error}"));
        assert!(confirm.is_ack(), "the broker refused the marker");
        let Some(next) = self.next(Duration::from_secs(30)).await else {
            panic!("the marker did not come back within 30 s");
        };
        let id = next.properties.message_id().as_ref().map(|id| id.to_string());
        assert_eq!(
            id.as_deref(),
            Some(marker.as_str()),
            "expected nothing more, got another message: type {:?}, routing key {}",
            next.properties.kind(),
            next.routing_key
        );
    }

    /// The channel, for publishing test messages.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }
}
