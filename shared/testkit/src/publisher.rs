//! Publishing hand-made messages, as a relay (or a misbehaving producer)
//! would.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use shop_contracts::Event;
use shop_messaging::wire::{self, EventHeaders};
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
    /// and headers the relay sets, signed with the tests' producer key
    /// ([`crate::keys::signing_key`]).
    pub async fn publish<E: Event>(&self, exchange: &str, event: &E, event_id: Uuid) -> anyhow::Result<()> {
        self.publish_signed_by(crate::keys::signing_key(), exchange, event, event_id)
            .await
    }

    /// [`Self::publish`] signed with `key`.
    pub async fn publish_signed_by<E: Event>(
        &self,
        key: &shop_messaging::signing::SigningKey,
        exchange: &str,
        event: &E,
        event_id: Uuid,
    ) -> anyhow::Result<()> {
        let body = event.encode_to_vec();
        let properties = Self::properties(event, event_id);
        let properties = key
            .sign_properties(properties, &body)
            .map_err(anyhow::Error::msg)?;
        self.publish_raw(exchange, E::ROUTING_KEY, &body, properties)
            .await
    }

    /// [`Self::publish`] of many events at once: all sent, then every
    /// confirm awaited (for tests that need thousands).
    pub async fn publish_all<E: Event>(&self, exchange: &str, events: &[(E, Uuid)]) -> anyhow::Result<()> {
        let key = crate::keys::signing_key();
        let mut confirms = Vec::with_capacity(events.len());
        for (event, event_id) in events {
            let body = event.encode_to_vec();
            let properties = key
                .sign_properties(Self::properties(event, *event_id), &body)
                .map_err(anyhow::Error::msg)?;
            confirms.push(
                self.channel
                    .basic_publish(
                        exchange.into(),
                        E::ROUTING_KEY.into(),
                        BasicPublishOptions::default(),
                        &body,
                        properties,
                    )
                    .await?,
            );
        }
        for confirm in confirms {
            anyhow::ensure!(
                confirm.await?.is_ack(),
                "the broker did not confirm a test message"
            );
        }
        Ok(())
    }

    /// [`Self::publish`] without a signature, as a stranger would.
    pub async fn publish_unsigned<E: Event>(
        &self,
        exchange: &str,
        event: &E,
        event_id: Uuid,
    ) -> anyhow::Result<()> {
        self.publish_raw(
            exchange,
            E::ROUTING_KEY,
            &event.encode_to_vec(),
            Self::properties(event, event_id),
        )
        .await
    }

    /// Any bytes with any properties, signed as they are with the tests'
    /// producer key: for messages that pass the signature check and then
    /// fail the others. Fails when a signed field is missing.
    pub async fn publish_raw_signed(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let properties = crate::keys::signing_key()
            .sign_properties(properties, body)
            .map_err(anyhow::Error::msg)?;
        self.publish_raw(exchange, routing_key, body, properties).await
    }

    /// Properties with every field a signature covers, for a message of
    /// type `kind` with id `id` about user `user` at `version` (whatever its
    /// body): to sign a message that then fails the consumer's other checks.
    pub fn signable(kind: &str, id: &str, user: &str, version: i64) -> BasicProperties {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(wire::AGGREGATE_TYPE.into(), wire::long_string("user"));
        headers.insert(wire::AGGREGATE_ID.into(), wire::long_string(user));
        headers.insert(
            wire::AGGREGATE_VERSION.into(),
            lapin::types::AMQPValue::LongLongInt(version),
        );
        BasicProperties::default()
            .with_content_type(wire::CONTENT_TYPE.into())
            .with_type(kind.into())
            .with_message_id(id.into())
            .with_app_id("test".into())
            .with_headers(headers)
    }

    /// The properties and headers the relay sets for `event` (unsigned).
    pub fn properties<E: Event>(event: &E, event_id: Uuid) -> BasicProperties {
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
        headers.properties()
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
