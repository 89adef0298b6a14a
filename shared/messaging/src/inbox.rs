//! The inbox: ids of the events a consumer has applied, written in the same
//! transaction as the handler's changes, so a redelivered or duplicated
//! event is recognised and acknowledged without a second effect.
//!
//! Only events that carry no aggregate version are recorded here. A
//! sequenced event (with `x-aggregate-*` headers) is told apart by its
//! aggregate's position in `inbox_sequence` ([`crate::sequence`]): a version
//! at or below the position is a repeat, whatever its id. One row per
//! aggregate instead of one per event keeps the hot path to a lock, a read
//! and an upsert, and the record never expires.
//!
//! Each consuming service's migrations create the table:
//!
//! ```sql
//! CREATE TABLE inbox (
//!     consumer      TEXT NOT NULL,          -- the queue, e.g. order-service.user-events
//!     event_id      UUID NOT NULL,          -- the AMQP message_id
//!     event_type    TEXT NOT NULL,
//!     processed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
//!     PRIMARY KEY (consumer, event_id)
//! );
//! CREATE INDEX inbox_processed_at ON inbox (processed_at);
//! ```
//!
//! Rows older than the consumer's inbox retention (`INBOX_RETENTION`) are
//! deleted by the service host's retention sweep
//! (`shop_database::retention`); a duplicate arriving later than that is
//! still harmless to projections that ignore stale versions.

use std::collections::HashSet;

use diesel::QueryableByName;
use diesel::sql_types::{Array, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use shop_database::prepared;
use uuid::Uuid;

diesel::table! {
    /// Events applied per consumer.
    inbox (consumer, event_id) {
        consumer -> Text,
        event_id -> Uuid,
        event_type -> Text,
        processed_at -> Timestamptz,
    }
}

/// Records `events` (id, type) as applied by `consumer` in one statement and
/// returns the ids that were new; the others were applied before. The
/// statement's text is the same for any number of events (arrays, not a
/// list of values), so it is prepared once per connection.
pub async fn record(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    events: &[(Uuid, &str)],
) -> diesel::QueryResult<HashSet<Uuid>> {
    let (ids, types): (Vec<Uuid>, Vec<&str>) = events.iter().copied().unzip();
    let fresh: Vec<Fresh> = prepared(
        diesel::sql_query(
            "INSERT INTO inbox (consumer, event_id, event_type) \
             SELECT $1, e.id, e.t FROM unnest($2::uuid[], $3::text[]) AS e(id, t) \
             ON CONFLICT DO NOTHING RETURNING event_id",
        )
        .bind::<Text, _>(consumer)
        .bind::<Array<diesel::sql_types::Uuid>, _>(&ids)
        .bind::<Array<Text>, _>(&types),
    )
    .load(conn)
    .await?;
    Ok(fresh.into_iter().map(|row| row.event_id).collect())
}

/// An id [`record`] found new.
#[derive(QueryableByName)]
struct Fresh {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    event_id: Uuid,
}
