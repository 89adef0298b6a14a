//! The `outbox` table. Each service's migrations create it with this shape
//! (see `migrations/README.md`); a test compares it to the migrated database.

diesel::table! {
    /// Events written by commands, waiting for (or past) publication.
    outbox (seq) {
        /// Insertion order; per aggregate also commit order, because the
        /// command locks the aggregate's row before inserting its event.
        seq -> BigInt,
        /// UUIDv7, the AMQP `message_id`. Not indexed: nothing looks a
        /// row up by it (see the `drop_outbox_event_id_index` migrations).
        event_id -> Uuid,
        aggregate_type -> Text,
        aggregate_id -> Text,
        aggregate_version -> BigInt,
        /// `hash(aggregate_id) % PARTITIONS`: the unit relays claim.
        partition_key -> SmallInt,
        /// Full protobuf message name, the AMQP `type`.
        event_type -> Text,
        routing_key -> Text,
        /// The protobuf-encoded event.
        payload -> Binary,
        /// W3C propagation fields of the command's span.
        trace_context -> Jsonb,
        created_at -> Timestamptz,
        /// Set once the broker confirmed the publish.
        published_at -> Nullable<Timestamptz>,
    }
}
