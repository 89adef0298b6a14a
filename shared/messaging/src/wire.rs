//! The wire contract of an event on RabbitMQ.
//!
//! | part | value |
//! |---|---|
//! | body | the protobuf encoding of one event message |
//! | `content_type` | `application/x-protobuf` |
//! | `type` | full protobuf message name ([`shop_contracts::Event::TYPE_NAME`]) |
//! | `message_id` | event id (UUIDv7) |
//! | `app_id` | producing service |
//! | `user_id` | the broker user that sent this copy (RabbitMQ refuses any other: [`sent_by`]) |
//! | `timestamp` | when the event was recorded (seconds since the epoch) |
//! | `delivery_mode` | 2 (persistent) |
//! | header `traceparent`, `tracestate`, `baggage` | W3C trace context of the publish span |
//! | header `aggregate_type`, `aggregate_id`, `aggregate_version` | the aggregate the event is about |
//! | header `partition` | [`partition_of`] the aggregate id, `0..`[`PARTITIONS`] |
//! | header `CC` | `["partition.<k>"]`, the partition as a second routing key ([`partition_routing_key`]) |
//! | header `signature` | the producer's Ed25519 signature of the event, base64 (64 bytes; what it covers: [`crate::signing`]) |
//! | header `signature_key_id` | the id of the key that made it (keys rotate by id) |
//!
//! A consumer checks the signature before anything else and refuses what
//! does not verify (`unauthenticated`); the signed values are the event id,
//! the type, the aggregate type, id and version, the producer (`app_id`)
//! and the body, as fixed canonical bytes, not the header table as sent.
//!
//! The consumer writes headers of its own on the copies it makes (retries,
//! dead letters, released parked events): [`BOOKKEEPING`], sealed by
//! [`SEAL`] ([`crate::seal`]); on any other delivery they are ignored.
//!
//! Routing: the producer's topic exchange, routing key
//! [`shop_contracts::Event::ROUTING_KEY`]. A consumer group routes on from
//! there by the partition (see [`crate::topology`]): the `CC` header is
//! RabbitMQ's sender-selected distribution, a list of routing keys the
//! broker uses besides the message's own, so a direct exchange can route by
//! partition at the cost of one table lookup. (Routing by the `partition`
//! header alone goes through a headers exchange, which compares the message
//! with each of its 32 bindings: half the broker's publishing rate.)
//!
//! `aggregate_version` numbers an aggregate's events 1, 2, 3, … without gaps:
//! every change of an aggregate is one event. Consumers rely on it to apply
//! each aggregate's events once and in order ([`crate::sequence`]).

use std::collections::HashMap;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use opentelemetry::Context;

/// `content_type` of every event.
pub const CONTENT_TYPE: &str = "application/x-protobuf";
/// Header: kind of aggregate (`user`, `order`).
pub const AGGREGATE_TYPE: &str = "aggregate_type";
/// Header: id of the aggregate.
pub const AGGREGATE_ID: &str = "aggregate_id";
/// Header: version of the aggregate after the event.
pub const AGGREGATE_VERSION: &str = "aggregate_version";
/// Header: the aggregate's partition ([`partition_of`]), which consumer
/// groups route by.
pub const PARTITION: &str = "partition";
/// Header: more routing keys for the broker (sender-selected distribution);
/// events carry [`partition_routing_key`] in it.
pub const CC: &str = "CC";
/// Header: the producer's Ed25519 signature of the event, base64 (standard
/// alphabet, padded; 64 bytes): see [`crate::signing`] for what it covers.
pub const SIGNATURE: &str = "signature";
/// Header: the id of the key that made [`SIGNATURE`], which consumers look
/// up among the keys they trust for the producer; keys rotate by id.
pub const SIGNATURE_KEY_ID: &str = "signature_key_id";
/// Header: the consumer's seal over its own bookkeeping headers
/// ([`BOOKKEEPING`]), base64 HMAC-SHA256 ([`crate::seal`]). Bookkeeping
/// headers count only on a copy whose seal checks out.
pub const SEAL: &str = "seal";
/// AMQP delivery mode of a message the broker writes to disk.
pub const PERSISTENT: u8 = 2;

/// Everything but the body of one event on the wire.
#[derive(Debug, Clone)]
pub struct EventHeaders<'a> {
    /// Event id, the AMQP `message_id`.
    pub event_id: &'a str,
    /// Full protobuf message name, the AMQP `type`.
    pub type_name: &'a str,
    /// Producing service, the AMQP `app_id`.
    pub app_id: &'a str,
    /// Seconds since the epoch when the event was recorded.
    pub timestamp: u64,
    /// See [`AGGREGATE_TYPE`].
    pub aggregate_type: &'a str,
    /// See [`AGGREGATE_ID`].
    pub aggregate_id: &'a str,
    /// See [`AGGREGATE_VERSION`].
    pub aggregate_version: i64,
    /// See [`PARTITION`].
    pub partition: i16,
    /// Propagation fields (`traceparent`, …) to put in the headers.
    pub trace: &'a HashMap<String, String>,
}

impl EventHeaders<'_> {
    /// The AMQP properties of the event.
    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        for (key, value) in self.trace {
            headers.insert(key.as_str().into(), long_string(value));
        }
        headers.insert(AGGREGATE_TYPE.into(), long_string(self.aggregate_type));
        headers.insert(AGGREGATE_ID.into(), long_string(self.aggregate_id));
        headers.insert(
            AGGREGATE_VERSION.into(),
            AMQPValue::LongLongInt(self.aggregate_version),
        );
        headers.insert(PARTITION.into(), AMQPValue::ShortInt(self.partition));
        headers.insert(
            CC.into(),
            AMQPValue::FieldArray(vec![long_string(&partition_routing_key(self.partition))].into()),
        );
        BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_type(self.type_name.into())
            .with_message_id(self.event_id.into())
            .with_app_id(self.app_id.into())
            .with_timestamp(self.timestamp)
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers)
    }

    /// [`Self::properties`] with the producer's signature of the event
    /// ([`crate::signing`]): `body` is the event's body, `key` the
    /// producer's.
    pub fn signed_properties(&self, body: &[u8], key: &crate::signing::SigningKey) -> BasicProperties {
        let properties = self.properties();
        let mut headers = properties.headers().clone().unwrap_or_default();
        key.sign_into(
            &crate::signing::SignedFields {
                event_id: self.event_id,
                type_name: self.type_name,
                aggregate_type: self.aggregate_type,
                aggregate_id: self.aggregate_id,
                aggregate_version: self.aggregate_version,
                producer: self.app_id,
                body,
            },
            &mut headers,
        );
        properties.with_headers(headers)
    }
}

/// `properties` as sent by broker user `user`. RabbitMQ validates the
/// `user_id` property: a message whose `user_id` is not the user of the
/// connection publishing it is refused (`PRECONDITION_FAILED`) and the
/// channel closed. So the relay stamps every event with its own user, and
/// whoever publishes a copy of a delivery (a retry, a dead letter, a replay,
/// a message moved off a retired queue) stamps the copy with its own; a
/// released parked event, rebuilt from what was parked, goes without one.
/// The `user_id` of a message says who put it where it is; a consumer does
/// not take it as proof of the event's producer (the event's signature is
/// that).
pub fn sent_by(properties: BasicProperties, user: &str) -> BasicProperties {
    properties.with_user_id(user.into())
}

/// The routing key that carries wire partition `partition` to a consumer
/// group (in the [`CC`] header): `partition.<k>`.
pub fn partition_routing_key(partition: i16) -> String {
    format!("partition.{partition}")
}

/// Number of partitions aggregates are spread over, by [`partition_of`]
/// their id: the unit outbox relays claim and consumer groups route by.
/// Changing it moves aggregates between partitions; keep it fixed for a
/// deployment.
pub const PARTITIONS: i16 = 32;

/// The partition of an aggregate: FNV-1a of its id modulo [`PARTITIONS`],
/// stable across builds and platforms.
pub fn partition_of(aggregate_id: &str) -> i16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in aggregate_id.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    // The remainder is below PARTITIONS, so it fits.
    i16::try_from(hash % PARTITIONS.unsigned_abs() as u32).unwrap_or(0)
}

/// A header value as an AMQP long string.
pub fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// The text of a string-like header value.
pub fn header_str<'a>(headers: &'a FieldTable, key: &str) -> Option<&'a str> {
    match headers.inner().get(&ShortString::from(key))? {
        AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
        AMQPValue::ShortString(value) => Some(value.as_str()),
        _ => None,
    }
}

/// The value of an integer header, whatever integer width it was sent with.
pub fn header_i64(headers: &FieldTable, key: &str) -> Option<i64> {
    match headers.inner().get(&ShortString::from(key))? {
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        AMQPValue::LongString(v) => std::str::from_utf8(v.as_bytes()).ok()?.parse().ok(),
        _ => None,
    }
}

/// The trace context carried in message headers (empty when there is none).
pub fn extract_trace(headers: Option<&FieldTable>) -> Context {
    let Some(headers) = headers else {
        return Context::new();
    };
    let fields: HashMap<String, String> = ["traceparent", "tracestate", "baggage"]
        .into_iter()
        .filter_map(|key| Some((key.to_owned(), header_str(headers, key)?.to_owned())))
        .collect();
    shop_telemetry::propagation::extract_map(&fields)
}

/// Header: the delivery attempt a message is on (absent on the first).
pub const ATTEMPT: &str = "attempt";
/// Header: exchange the message was first published to (kept through retries
/// and dead-lettering).
pub const ORIGINAL_EXCHANGE: &str = "original_exchange";
/// Header: routing key the message was first published with.
pub const ORIGINAL_ROUTING_KEY: &str = "original_routing_key";
/// Header: queue the message was consumed from when it was retried or
/// dead-lettered; replay sends it back there.
pub const ORIGINAL_QUEUE: &str = "original_queue";
/// Header: set on a parked event sent back to its queue once the versions
/// before it were applied ([`crate::sequence`]).
pub const RELEASED: &str = "released";
/// Header: the last error of a message sent to a retry queue.
pub const LAST_ERROR: &str = "last_error";
/// Header: why a message was dead-lettered (a [`DeadLetterReason`]).
pub const DEAD_LETTER_REASON: &str = "dead_letter_reason";
/// Header: the error text that made it a dead letter.
pub const DEAD_LETTER_ERROR: &str = "dead_letter_error";
/// Header: how many attempts were made before it was dead-lettered.
pub const DEAD_LETTER_ATTEMPTS: &str = "dead_letter_attempts";
/// Header: when it was dead-lettered (RFC 3339).
pub const DEAD_LETTERED_AT: &str = "dead_lettered_at";

/// The headers a consumer writes for itself on the copies it sends to its
/// delay queues, its dead-letter queue and back to its partitions, in the
/// fixed order its seal covers them ([`crate::seal`]). On a delivery whose
/// seal does not check out they are ignored (and dropped from any copy the
/// consumer makes): a stranger's `attempt=99` is a first attempt.
pub const BOOKKEEPING: [&str; 10] = [
    ATTEMPT,
    RELEASED,
    LAST_ERROR,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    ORIGINAL_QUEUE,
    DEAD_LETTER_REASON,
    DEAD_LETTER_ERROR,
    DEAD_LETTER_ATTEMPTS,
    DEAD_LETTERED_AT,
];

/// Why a message ended in a dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterReason {
    /// Larger than the consumer's `CONSUMER_MAX_MESSAGE_BYTES`: refused
    /// before anything else, without decoding it.
    TooLarge,
    /// Unsigned, signed by a key the consumer does not trust, or not
    /// matching its signature: not the producer's event. Never retried,
    /// never sequenced, never holds an aggregate's later events.
    Unauthenticated,
    /// No `message_id`, or not a UUID: the inbox cannot deduplicate it.
    MissingMessageId,
    /// No `type`, or one no handler is subscribed to.
    UnknownType,
    /// The body does not decode as its `type`.
    Undecodable,
    /// The handler refused it as something that can never succeed.
    Rejected,
    /// The handler failed on every attempt.
    MaxAttempts,
    /// Ahead of its aggregate's next version while the consumer already
    /// holds as many parked events as it may (per aggregate or in all).
    ParkLimit,
}

impl DeadLetterReason {
    /// Every reason.
    pub const ALL: [Self; 8] = [
        Self::TooLarge,
        Self::Unauthenticated,
        Self::MissingMessageId,
        Self::UnknownType,
        Self::Undecodable,
        Self::Rejected,
        Self::MaxAttempts,
        Self::ParkLimit,
    ];

    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TooLarge => "too-large",
            Self::Unauthenticated => "unauthenticated",
            Self::MissingMessageId => "missing-message-id",
            Self::UnknownType => "unknown-type",
            Self::Undecodable => "undecodable",
            Self::Rejected => "rejected",
            Self::MaxAttempts => "max-attempts",
            Self::ParkLimit => "park-limit",
        }
    }
}

impl std::fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DeadLetterReason {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|reason| reason.as_str() == value)
            .ok_or_else(|| {
                let known: Vec<_> = Self::ALL.iter().map(|r| r.as_str()).collect();
                format!("unknown reason {value:?}; known: {}", known.join(", "))
            })
    }
}
