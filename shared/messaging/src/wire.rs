//! The wire contract of an event on RabbitMQ.
//!
//! | part | value |
//! |---|---|
//! | body | the protobuf encoding of one event message |
//! | `content_type` | `application/x-protobuf` |
//! | `type` | full protobuf message name ([`shop_contracts::Event::TYPE_NAME`]) |
//! | `message_id` | event id (UUIDv7) |
//! | `app_id` | producing service |
//! | `timestamp` | when the event was recorded (seconds since the epoch) |
//! | `delivery_mode` | 2 (persistent) |
//! | header `traceparent`, `tracestate`, `baggage` | W3C trace context of the publish span |
//! | header `aggregate_type`, `aggregate_id`, `aggregate_version` | the aggregate the event is about |
//!
//! Routing: the producer's topic exchange, routing key
//! [`shop_contracts::Event::ROUTING_KEY`].

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
        BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_type(self.type_name.into())
            .with_message_id(self.event_id.into())
            .with_app_id(self.app_id.into())
            .with_timestamp(self.timestamp)
            .with_delivery_mode(PERSISTENT)
            .with_headers(headers)
    }
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
