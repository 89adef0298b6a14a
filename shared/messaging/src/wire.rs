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
//! | headers `ce-*` | opt-in (`RELAY_CLOUDEVENTS`): the CloudEvents binary-mode attributes, mirroring the properties above ([`CLOUDEVENTS`]) |
//!
//! [`PROPERTIES`] and [`HEADERS`] are this table as data, with each
//! header's AMQP field type and whether it is part of the contract: the one
//! place the AsyncAPI document, the events page and the golden envelopes of
//! the contract bundle (`docs/contract/`) are generated from, and that the
//! tests hold the relay's real messages against. A header added here appears
//! in all of them by regeneration.
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

/// Header (opt-in): CloudEvents `specversion`, always [`CLOUDEVENTS_SPEC_VERSION`].
pub const CE_SPECVERSION: &str = "ce-specversion";
/// Header (opt-in): CloudEvents `id`, the event id (as `message_id`).
pub const CE_ID: &str = "ce-id";
/// Header (opt-in): CloudEvents `source`, the producing service (as `app_id`).
pub const CE_SOURCE: &str = "ce-source";
/// Header (opt-in): CloudEvents `type`, the full protobuf message name (as `type`).
pub const CE_TYPE: &str = "ce-type";
/// Header (opt-in): CloudEvents `time`, when the event was recorded, RFC 3339
/// in UTC with milliseconds (as `timestamp`, which has whole seconds).
pub const CE_TIME: &str = "ce-time";
/// Header (opt-in): CloudEvents `subject`, the aggregate id (as `aggregate_id`).
pub const CE_SUBJECT: &str = "ce-subject";
/// The CloudEvents version the `ce-*` headers follow.
pub const CLOUDEVENTS_SPEC_VERSION: &str = "1.0";
/// The CloudEvents headers, in the order they are written.
pub const CLOUDEVENTS: [&str; 6] = [CE_SPECVERSION, CE_ID, CE_SOURCE, CE_TYPE, CE_TIME, CE_SUBJECT];

/// An AMQP 0-9-1 field-value type, as RabbitMQ and its clients write it (the
/// letters of RabbitMQ's errata to the specification, which differ from the
/// specification's own for `s` and `l`; clients that follow the
/// specification misread them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FieldType {
    /// `S`: long string, UTF-8 text here.
    LongString,
    /// `l`: signed 64-bit integer.
    LongLongInt,
    /// `s`: signed 16-bit integer.
    ShortInt,
    /// `t`: boolean.
    Boolean,
    /// `A`: array, here of long strings (`S`).
    LongStringArray,
}

impl FieldType {
    /// The type's letter on the wire (`A` for an array, whatever it holds).
    pub fn letter(self) -> char {
        match self {
            Self::LongString => 'S',
            Self::LongLongInt => 'l',
            Self::ShortInt => 's',
            Self::Boolean => 't',
            Self::LongStringArray => 'A',
        }
    }

    /// What the letter means, for people.
    pub fn meaning(self) -> &'static str {
        match self {
            Self::LongString => "long string (UTF-8)",
            Self::LongLongInt => "signed 64-bit integer",
            Self::ShortInt => "signed 16-bit integer",
            Self::Boolean => "boolean",
            Self::LongStringArray => "array of long strings (`S`)",
        }
    }

    /// The type of a header value as it was sent, if it is one of these.
    pub fn of(value: &AMQPValue) -> Option<Self> {
        match value {
            AMQPValue::LongString(_) => Some(Self::LongString),
            AMQPValue::LongLongInt(_) => Some(Self::LongLongInt),
            AMQPValue::ShortInt(_) => Some(Self::ShortInt),
            AMQPValue::Boolean(_) => Some(Self::Boolean),
            AMQPValue::FieldArray(items)
                if items
                    .as_slice()
                    .iter()
                    .all(|item| matches!(item, AMQPValue::LongString(_))) =>
            {
                Some(Self::LongStringArray)
            }
            _ => None,
        }
    }
}

/// Whether a header is part of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderRole {
    /// The producer writes it on every event; consumers may rely on it.
    Contract,
    /// The producer writes it when tracing is on and the call had a trace
    /// context; consumers must do without it.
    Optional,
    /// The producer writes it only when the setting named is on.
    OptIn(&'static str),
    /// A consumer writes it on its own copies of an event (retries, dead
    /// letters, released parked events). Not part of the contract: never on
    /// a producer's event; other consumers ignore it.
    Internal,
}

/// One header of the wire contract, or one a consumer writes for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderSpec {
    /// The header's name.
    pub name: &'static str,
    /// The AMQP type it is sent with.
    pub field_type: FieldType,
    /// Whether it is part of the contract.
    pub role: HeaderRole,
    /// What it holds.
    pub meaning: &'static str,
}

/// Every header of the wire contract, then the consumer's own ones: the
/// table the contract documents are generated from.
pub const HEADERS: &[HeaderSpec] = &[
    HeaderSpec {
        name: AGGREGATE_TYPE,
        field_type: FieldType::LongString,
        role: HeaderRole::Contract,
        meaning: "kind of aggregate the event is about (`user`, `order`): the message's `aggregate_type` option",
    },
    HeaderSpec {
        name: AGGREGATE_ID,
        field_type: FieldType::LongString,
        role: HeaderRole::Contract,
        meaning: "id of the aggregate: the body's aggregate id field (a UUID)",
    },
    HeaderSpec {
        name: AGGREGATE_VERSION,
        field_type: FieldType::LongLongInt,
        role: HeaderRole::Contract,
        meaning: "version of the aggregate after the event, 1, 2, 3, … without gaps: the body's version field",
    },
    HeaderSpec {
        name: PARTITION,
        field_type: FieldType::ShortInt,
        role: HeaderRole::Contract,
        meaning: "FNV-1a (32-bit) of the aggregate id's UTF-8 bytes, modulo 32",
    },
    HeaderSpec {
        name: CC,
        field_type: FieldType::LongStringArray,
        role: HeaderRole::Contract,
        meaning: "`[\"partition.<partition>\"]`: a second routing key for the broker (sender-selected distribution; RabbitMQ removes it before delivery)",
    },
    HeaderSpec {
        name: SIGNATURE,
        field_type: FieldType::LongString,
        role: HeaderRole::Contract,
        meaning: "the producer's Ed25519 signature of the event, base64 (standard alphabet, padded; 64 bytes), over the canonical bytes of the rules below",
    },
    HeaderSpec {
        name: SIGNATURE_KEY_ID,
        field_type: FieldType::LongString,
        role: HeaderRole::Contract,
        meaning: "the id of the producer's key that made `signature` (keys rotate by id)",
    },
    HeaderSpec {
        name: "traceparent",
        field_type: FieldType::LongString,
        role: HeaderRole::Optional,
        meaning: "W3C trace context of the publish span",
    },
    HeaderSpec {
        name: "tracestate",
        field_type: FieldType::LongString,
        role: HeaderRole::Optional,
        meaning: "W3C trace state, when the trace has one",
    },
    HeaderSpec {
        name: "baggage",
        field_type: FieldType::LongString,
        role: HeaderRole::Optional,
        meaning: "W3C baggage, when the call carried some",
    },
    HeaderSpec {
        name: CE_SPECVERSION,
        field_type: FieldType::LongString,
        role: HeaderRole::OptIn(CLOUDEVENTS_SETTING),
        meaning: "CloudEvents `specversion`: `1.0`",
    },
    HeaderSpec {
        name: CE_ID,
        field_type: FieldType::LongString,
        role: HeaderRole::OptIn(CLOUDEVENTS_SETTING),
        meaning: "CloudEvents `id`: the event id, as `message_id`",
    },
    HeaderSpec {
        name: CE_SOURCE,
        field_type: FieldType::LongString,
        role: HeaderRole::OptIn(CLOUDEVENTS_SETTING),
        meaning: "CloudEvents `source`: the producing service, as `app_id`",
    },
    HeaderSpec {
        name: CE_TYPE,
        field_type: FieldType::LongString,
        role: HeaderRole::OptIn(CLOUDEVENTS_SETTING),
        meaning: "CloudEvents `type`: the full protobuf message name, as `type`",
    },
    HeaderSpec {
        name: CE_TIME,
        field_type: FieldType::LongString,
        role: HeaderRole::OptIn(CLOUDEVENTS_SETTING),
        meaning: "CloudEvents `time`: when the event was recorded, RFC 3339 in UTC with milliseconds",
    },
    HeaderSpec {
        name: CE_SUBJECT,
        field_type: FieldType::LongString,
        role: HeaderRole::OptIn(CLOUDEVENTS_SETTING),
        meaning: "CloudEvents `subject`: the aggregate id, as `aggregate_id`",
    },
    HeaderSpec {
        name: SEAL,
        field_type: FieldType::LongString,
        role: HeaderRole::Internal,
        meaning: "the consumer's HMAC over its own bookkeeping headers",
    },
    HeaderSpec {
        name: ATTEMPT,
        field_type: FieldType::LongLongInt,
        role: HeaderRole::Internal,
        meaning: "the delivery attempt of a retried copy",
    },
    HeaderSpec {
        name: LAST_ERROR,
        field_type: FieldType::LongString,
        role: HeaderRole::Internal,
        meaning: "the error that made a copy go to a retry queue",
    },
    HeaderSpec {
        name: RELEASED,
        field_type: FieldType::Boolean,
        role: HeaderRole::Internal,
        meaning: "set on a parked event sent back to its partition once its turn came",
    },
    HeaderSpec {
        name: ORIGINAL_EXCHANGE,
        field_type: FieldType::LongString,
        role: HeaderRole::Internal,
        meaning: "exchange the event was first published to",
    },
    HeaderSpec {
        name: ORIGINAL_ROUTING_KEY,
        field_type: FieldType::LongString,
        role: HeaderRole::Internal,
        meaning: "routing key the event was first published with",
    },
    HeaderSpec {
        name: ORIGINAL_QUEUE,
        field_type: FieldType::LongString,
        role: HeaderRole::Internal,
        meaning: "queue a retried or dead-lettered copy was consumed from",
    },
    HeaderSpec {
        name: DEAD_LETTER_REASON,
        field_type: FieldType::LongString,
        role: HeaderRole::Internal,
        meaning: "why a copy is a dead letter",
    },
    HeaderSpec {
        name: DEAD_LETTER_ERROR,
        field_type: FieldType::LongString,
        role: HeaderRole::Internal,
        meaning: "the error text that made it a dead letter",
    },
    HeaderSpec {
        name: DEAD_LETTER_ATTEMPTS,
        field_type: FieldType::LongLongInt,
        role: HeaderRole::Internal,
        meaning: "attempts made before it was dead-lettered",
    },
    HeaderSpec {
        name: DEAD_LETTERED_AT,
        field_type: FieldType::LongString,
        role: HeaderRole::Internal,
        meaning: "when it was dead-lettered, RFC 3339",
    },
];

/// The setting that turns the CloudEvents headers on (the relay's).
pub const CLOUDEVENTS_SETTING: &str = "RELAY_CLOUDEVENTS";

/// One AMQP basic property of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PropertySpec {
    /// The property's name (as the AMQP 0-9-1 specification spells it).
    pub name: &'static str,
    /// Its AMQP domain (`shortstr`, `octet`, `timestamp`).
    pub domain: &'static str,
    /// The value every event carries, when it is fixed.
    pub fixed: Option<&'static str>,
    /// What it holds.
    pub meaning: &'static str,
}

/// The AMQP properties of every event (the rest are not set).
pub const PROPERTIES: &[PropertySpec] = &[
    PropertySpec {
        name: "content_type",
        domain: "shortstr",
        fixed: Some(CONTENT_TYPE),
        meaning: "the body is the protobuf encoding of one event message",
    },
    PropertySpec {
        name: "type",
        domain: "shortstr",
        fixed: None,
        meaning: "full protobuf message name of the body, e.g. `shop.user.v1.UserCreated`",
    },
    PropertySpec {
        name: "message_id",
        domain: "shortstr",
        fixed: None,
        meaning: "event id, a UUIDv7 (its text): deduplicate by it",
    },
    PropertySpec {
        name: "app_id",
        domain: "shortstr",
        fixed: None,
        meaning: "producing service, e.g. `user-service`",
    },
    PropertySpec {
        name: "user_id",
        domain: "shortstr",
        fixed: None,
        meaning: "the broker user that published this copy (each service has its own; the shipped definitions name it after the service): RabbitMQ refuses a publish whose `user_id` is not its connection's user. It says who put the message on the broker, not who made the event",
    },
    PropertySpec {
        name: "timestamp",
        domain: "timestamp",
        fixed: None,
        meaning: "when the event was recorded, seconds since the Unix epoch",
    },
    PropertySpec {
        name: "delivery_mode",
        domain: "octet",
        fixed: Some("2"),
        meaning: "persistent",
    },
];

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

    /// `properties` with the CloudEvents headers added ([`CLOUDEVENTS`]),
    /// `recorded_at` being when the event was recorded.
    pub fn with_cloudevents(
        &self,
        properties: BasicProperties,
        recorded_at: chrono::DateTime<chrono::Utc>,
    ) -> BasicProperties {
        let mut headers = properties.headers().clone().unwrap_or_default();
        let time = recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        for (key, value) in [
            (CE_SPECVERSION, CLOUDEVENTS_SPEC_VERSION),
            (CE_ID, self.event_id),
            (CE_SOURCE, self.app_id),
            (CE_TYPE, self.type_name),
            (CE_TIME, time.as_str()),
            (CE_SUBJECT, self.aggregate_id),
        ] {
            headers.insert(key.into(), long_string(value));
        }
        properties.with_headers(headers)
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
    /// Its handling ended without an outcome (the process died: an abort,
    /// a kill, out of memory) more times than the consumer's attempt
    /// limit: counted by the consumer in its database, since a crash
    /// writes no header.
    Crashed,
}

impl DeadLetterReason {
    /// Every reason.
    pub const ALL: [Self; 9] = [
        Self::TooLarge,
        Self::Unauthenticated,
        Self::MissingMessageId,
        Self::UnknownType,
        Self::Undecodable,
        Self::Rejected,
        Self::MaxAttempts,
        Self::ParkLimit,
        Self::Crashed,
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
            Self::Crashed => "crashed",
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

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a (32-bit) from its published test vectors (`""` is the offset
    /// basis 0x811c9dc5, `a` 0xe40c292c, `foobar` 0xbf9cf968), and ids
    /// worked out by hand, never by this code: a change of the hash moves
    /// every aggregate to another partition queue while a relay of the old
    /// build still publishes, which reorders their events.
    #[test]
    fn partitions_are_fnv_1a_of_the_aggregate_id_modulo_32() {
        for (id, partition) in [
            ("", 0x811c_9dc5_u32 % 32),
            ("a", 0xe40c_292c % 32),
            ("foobar", 0xbf9c_f968 % 32),
        ] {
            assert_eq!(partition_of(id), i16::try_from(partition).unwrap(), "{id:?}");
        }
        for (id, partition) in [
            ("3f2504e0-4f89-41d3-9a0c-0305e82c3301", 17),
            ("0192f4c0-7d1e-7a3b-9c4d-5e6f708192a3", 3),
            ("user-0", 7),
            ("once", 4),
        ] {
            assert_eq!(partition_of(id), partition, "{id}");
        }
    }

    fn sample(trace: &HashMap<String, String>) -> EventHeaders<'_> {
        EventHeaders {
            event_id: "0192f4c0-7d1e-7a3b-9c4d-5e6f708192a3",
            type_name: "shop.user.v1.UserCreated",
            app_id: "user-service",
            timestamp: 1_764_000_000,
            aggregate_type: "user",
            aggregate_id: "0192f4c0-7d1e-7a3b-9c4d-5e6f708192a3",
            aggregate_version: 1,
            partition: 7,
            trace,
        }
    }

    fn written(properties: &BasicProperties) -> Vec<(String, Option<FieldType>)> {
        let mut headers: Vec<_> = properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.to_string(), FieldType::of(v)))
                    .collect()
            })
            .unwrap_or_default();
        headers.sort();
        headers
    }

    fn declared(roles: &[HeaderRole]) -> Vec<(String, Option<FieldType>)> {
        let mut headers: Vec<_> = HEADERS
            .iter()
            .filter(|h| roles.contains(&h.role))
            .map(|h| (h.name.to_owned(), Some(h.field_type)))
            .collect();
        headers.sort();
        headers
    }

    #[test]
    fn an_event_carries_exactly_the_contract_headers_of_the_table_with_their_types() {
        let trace = HashMap::from([(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        )]);
        let headers = sample(&trace);
        let (key, _) = crate::signing::SigningKey::generate("unit-test").unwrap();
        let signed = headers.signed_properties(b"body", &key);
        let mut expected = declared(&[HeaderRole::Contract]);
        expected.push(("traceparent".to_owned(), Some(FieldType::LongString)));
        expected.sort();
        assert_eq!(written(&signed), expected);

        let with_ce = headers.with_cloudevents(signed, chrono::DateTime::UNIX_EPOCH);
        let mut expected = declared(&[HeaderRole::Contract, HeaderRole::OptIn(CLOUDEVENTS_SETTING)]);
        expected.push(("traceparent".to_owned(), Some(FieldType::LongString)));
        expected.sort();
        assert_eq!(written(&with_ce), expected);
    }

    #[test]
    fn the_cloudevents_headers_mirror_the_properties() {
        let trace = HashMap::new();
        let headers = sample(&trace);
        let at = chrono::DateTime::from_timestamp_millis(1_764_000_000_123).unwrap();
        let properties = headers.with_cloudevents(headers.properties(), at);
        let table = properties.headers().clone().unwrap();
        let text = |key| header_str(&table, key).unwrap().to_owned();
        assert_eq!(text(CE_SPECVERSION), "1.0");
        assert_eq!(text(CE_ID), properties.message_id().as_ref().unwrap().as_str());
        assert_eq!(text(CE_SOURCE), properties.app_id().as_ref().unwrap().as_str());
        assert_eq!(text(CE_TYPE), properties.kind().as_ref().unwrap().as_str());
        assert_eq!(text(CE_TIME), "2025-11-24T16:00:00.123Z");
        assert_eq!(text(CE_SUBJECT), header_str(&table, AGGREGATE_ID).unwrap());
    }

    #[test]
    fn every_header_is_in_the_table_once() {
        let mut names: Vec<_> = HEADERS.iter().map(|h| h.name).collect();
        names.sort_unstable();
        let count = names.len();
        names.dedup();
        assert_eq!(names.len(), count, "a header is in the table twice");
        for name in CLOUDEVENTS {
            assert!(names.contains(&name), "{name} is not in the table");
        }
    }
}
