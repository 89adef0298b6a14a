//! Publishing hand-made messages, as a relay (or a misbehaving producer)
//! would.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use shop_contracts::Event;
use shop_messaging::wire::EventHeaders;
use uuid::Uuid;

/// A confirm-mode channel for publishing test messages.
#[derive(Debug)]
pub struct TestPublisher {
    _connection: Connection,
    channel: Channel,
}

impl TestPublisher {
    /// Connects and declares `exchange` (so publishing to it works before
    /// any service declared it).
    pub async fn connect(exchange: &str) -> anyhow::Result<Self> {
        Self::connect_to(&crate::amqp_url(), exchange).await
    }

    /// [`Self::connect`] to the broker at `url`, as its user (a producer's
    /// own, on a broker of the test's own).
    pub async fn connect_to(url: &str, exchange: &str) -> anyhow::Result<Self> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        shop_messaging::topology::declare_event_exchange(&channel, exchange).await?;
        Ok(Self {
            _connection: connection,
            channel,
        })
    }

    /// Publishes `event` to `exchange` with `event_id`, with the properties
    /// and headers the relay sets.
    pub async fn publish<E: Event>(&self, exchange: &str, event: &E, event_id: Uuid) -> anyhow::Result<()> {
        let id = event_id.to_string();
        let trace = Default::default();
        let headers = EventHeaders {
            event_id: &id,
            type_name: E::TYPE_NAME,
            app_id: "test",
            timestamp: 0,
            aggregate_type: E::AGGREGATE_TYPE,
            aggregate_id: event.aggregate_id(),
            aggregate_version: event.aggregate_version(),
            partition: shop_messaging::wire::partition_of(event.aggregate_id()),
            trace: &trace,
        };
        self.publish_raw(
            exchange,
            E::ROUTING_KEY,
            &event.encode_to_vec(),
            headers.properties(),
        )
        .await
    }

    /// Publishes any bytes with any properties, waiting for the confirm.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?
            .await?;
        anyhow::ensure!(confirm.is_ack(), "the broker did not confirm the test message");
        Ok(())
    }
}
