//! Event metadata bound to the generated messages.

use crate::order::{OrderCancelled, OrderCreated};
use crate::user::{UserCreated, UserDeleted, UserSnapshot, UserUpdated};

/// A protobuf message that is published as an event.
///
/// Every event is bound here, once, to the names it carries on the wire: the
/// AMQP `type` property ([`Event::TYPE_NAME`], the full protobuf message name)
/// and the routing key on its producer's topic exchange
/// ([`Event::ROUTING_KEY`]). Producers and consumers use these constants, so a
/// renamed message or routing key is a compile-time change in one place.
pub trait Event: prost::Message + prost::Name + Default + Clone + Send + Sync + 'static {
    /// Full protobuf message name, e.g. `shop.user.v1.UserCreated`.
    const TYPE_NAME: &'static str;
    /// Routing key on the producing service's topic exchange, e.g. `user.created`.
    const ROUTING_KEY: &'static str;
    /// Kind of aggregate the event belongs to, e.g. `user`.
    const AGGREGATE_TYPE: &'static str;
    /// Topic exchange the producer publishes it to unless a setting names
    /// another one, e.g. `user.events`: taken from the `.proto` option.
    const DEFAULT_EXCHANGE: &'static str;
    /// The event carries the aggregate's whole state at its version (the
    /// `.proto` option `state_carrying`): its effect does not depend on the
    /// versions before it, so a consumer may apply it past a gap.
    const STATE_CARRYING: bool;
    /// The event is a snapshot (the `.proto` option `snapshot`): the whole
    /// state at its version, republished on request. A consumer takes one
    /// above its position as a jump to that version; it may repeat a version
    /// with a new event id without being a conflict.
    const SNAPSHOT: bool;

    /// Id of the aggregate (the user, the order) the event is about.
    fn aggregate_id(&self) -> &str;
    /// Version of the aggregate after this event; consumers use it to ignore
    /// stale and repeated events.
    fn aggregate_version(&self) -> i64;

    /// What the body says it is about, in one value: consumers compare it
    /// with the aggregate headers their sequencing goes by, so a body and
    /// headers that disagree are refused whatever the event type.
    fn identity(&self) -> EventIdentity {
        EventIdentity {
            aggregate_type: Self::AGGREGATE_TYPE,
            aggregate_id: self.aggregate_id().to_owned(),
            aggregate_version: self.aggregate_version(),
        }
    }
}

/// The aggregate an event body names: its kind, its id and its version
/// after the event ([`Event::identity`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventIdentity {
    /// See [`Event::AGGREGATE_TYPE`].
    pub aggregate_type: &'static str,
    /// See [`Event::aggregate_id`].
    pub aggregate_id: String,
    /// See [`Event::aggregate_version`].
    pub aggregate_version: i64,
}

/// The names of one event type, as plain data: for tools that deal with
/// events they do not decode (dead-letter listings, replay filters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventType {
    /// See [`Event::TYPE_NAME`].
    pub type_name: &'static str,
    /// See [`Event::ROUTING_KEY`].
    pub routing_key: &'static str,
    /// See [`Event::SNAPSHOT`].
    pub snapshot: bool,
}

/// One event as its `.proto` declares it (the option
/// `shop.options.v1.event` on the message): the source of truth the event
/// table below is checked against when it compiles, and that the AsyncAPI
/// document and the contract bundle are generated from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeclaredEvent {
    /// Full protobuf message name.
    pub type_name: &'static str,
    /// Exchange the producer publishes to by default.
    pub default_exchange: &'static str,
    /// Routing key on that exchange.
    pub routing_key: &'static str,
    /// Kind of aggregate (`aggregate_type` header).
    pub aggregate_type: &'static str,
    /// Field holding the aggregate id.
    pub aggregate_id_field: &'static str,
    /// Field holding the aggregate version.
    pub aggregate_version_field: &'static str,
    /// See [`Event::STATE_CARRYING`].
    pub state_carrying: bool,
    /// See [`Event::SNAPSHOT`].
    pub snapshot: bool,
}

include!(concat!(env!("OUT_DIR"), "/declared_events.rs"));

/// Byte-wise string equality, usable in constants.
const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The declaration of `type_name` in [`DECLARED_EVENTS`]; stops the build
/// when there is none.
const fn declared(type_name: &str) -> &'static DeclaredEvent {
    let mut i = 0;
    while i < DECLARED_EVENTS.len() {
        if same(DECLARED_EVENTS[i].type_name, type_name) {
            return &DECLARED_EVENTS[i];
        }
        i += 1;
    }
    panic!("an event in the event table has no `shop.options.v1.event` option in proto/")
}

/// Whether a row of the event table says what the `.proto` declares.
const fn row_matches(type_name: &str, routing_key: &str, aggregate: &str, id: &str, version: &str) -> bool {
    let declared = declared(type_name);
    same(declared.routing_key, routing_key)
        && same(declared.aggregate_type, aggregate)
        && same(declared.aggregate_id_field, id)
        && same(declared.aggregate_version_field, version)
}

macro_rules! events {
    ($($ty:ident { type_name: $name:literal, routing_key: $key:literal, aggregate: $agg:literal, id: $id:ident, version: $version:ident })*) => {
        $(
            // A row that differs from the `.proto` option stops the build
            // here: a routing key (or aggregate) is changed in both places
            // or in neither.
            const _: () = assert!(
                row_matches($name, $key, $agg, stringify!($id), stringify!($version)),
                concat!("the event table's row for ", $name, " differs from its `shop.options.v1.event` option in proto/")
            );

            impl Event for $ty {
                const TYPE_NAME: &'static str = $name;
                const ROUTING_KEY: &'static str = $key;
                const AGGREGATE_TYPE: &'static str = $agg;
                const DEFAULT_EXCHANGE: &'static str = declared($name).default_exchange;
                const STATE_CARRYING: bool = declared($name).state_carrying;
                const SNAPSHOT: bool = declared($name).snapshot;

                fn aggregate_id(&self) -> &str {
                    &self.$id
                }

                fn aggregate_version(&self) -> i64 {
                    self.$version
                }
            }
        )*

        // Every event the `.proto` files declare has its row (each row has
        // its declaration, above).
        const _: () = assert!(
            DECLARED_EVENTS.len() == [$($name),*].len(),
            "a message with the `shop.options.v1.event` option in proto/ has no row in the event table"
        );

        /// Every event type of the system.
        pub fn all_event_types() -> &'static [EventType] {
            const TYPES: &[EventType] = &[$(EventType { type_name: $name, routing_key: $key, snapshot: declared($name).snapshot }),*];
            TYPES
        }

        /// A readable rendering of an encoded event of type `type_name`, for
        /// tools showing messages they do not handle (dead letters): `None`
        /// for an unknown type, an error for a body that does not decode.
        pub fn describe_event(type_name: &str, body: &[u8]) -> Option<Result<String, prost::DecodeError>> {
            match type_name {
                $($name => Some(<$ty as prost::Message>::decode(body).map(|event| format!("{event:#?}"))),)*
                _ => None,
            }
        }

        /// What an encoded event of type `type_name` says it is about
        /// ([`Event::identity`]), for tools that check events they do not
        /// handle: `None` for an unknown type, an error for a body that does
        /// not decode.
        pub fn identify_event(type_name: &str, body: &[u8]) -> Option<Result<EventIdentity, prost::DecodeError>> {
            match type_name {
                $($name => Some(<$ty as prost::Message>::decode(body).map(|event| event.identity())),)*
                _ => None,
            }
        }

        #[cfg(test)]
        mod bound_names {
            use super::*;

            #[test]
            fn every_type_name_is_the_full_protobuf_name() {
                $(assert_eq!(<$ty as Event>::TYPE_NAME, <$ty as prost::Name>::full_name());)*
            }

            #[test]
            fn every_row_is_the_declaration_of_its_proto_option() {
                let rows = [$(DeclaredEvent {
                    type_name: $name,
                    default_exchange: <$ty as Event>::DEFAULT_EXCHANGE,
                    routing_key: $key,
                    aggregate_type: $agg,
                    aggregate_id_field: stringify!($id),
                    aggregate_version_field: stringify!($version),
                    state_carrying: <$ty as Event>::STATE_CARRYING,
                    snapshot: <$ty as Event>::SNAPSHOT,
                }),*];
                let mut rows = rows.to_vec();
                rows.sort_by_key(|row| row.type_name);
                assert_eq!(rows, DECLARED_EVENTS);
            }

            #[test]
            fn every_event_body_names_its_aggregate_and_version() {
                $(
                    let mut event = <$ty>::default();
                    event.$id = "agg-1".to_owned();
                    event.version = 7;
                    let body = prost::Message::encode_to_vec(&event);
                    let identity = identify_event($name, &body).unwrap().unwrap();
                    assert_eq!(identity, EventIdentity { aggregate_type: $agg, aggregate_id: "agg-1".to_owned(), aggregate_version: 7 });
                )*
                assert!(identify_event("shop.user.v1.Nope", b"").is_none());
            }
        }
    };
}

events! {
    UserCreated { type_name: "shop.user.v1.UserCreated", routing_key: "user.created", aggregate: "user", id: user_id, version: version }
    UserUpdated { type_name: "shop.user.v1.UserUpdated", routing_key: "user.updated", aggregate: "user", id: user_id, version: version }
    UserDeleted { type_name: "shop.user.v1.UserDeleted", routing_key: "user.deleted", aggregate: "user", id: user_id, version: version }
    UserSnapshot { type_name: "shop.user.v1.UserSnapshot", routing_key: "user.snapshot", aggregate: "user", id: user_id, version: version }
    OrderCreated { type_name: "shop.order.v1.OrderCreated", routing_key: "order.created", aggregate: "order", id: order_id, version: version }
    OrderCancelled { type_name: "shop.order.v1.OrderCancelled", routing_key: "order.cancelled", aggregate: "order", id: order_id, version: version }
}
