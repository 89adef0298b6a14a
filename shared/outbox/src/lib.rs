//! The transactional outbox.
//!
//! A command writes its domain rows and its event in **one** PostgreSQL
//! transaction ([`enqueue`]), so an event exists exactly when the change it
//! describes does. The [`Relay`] then publishes the stored events to the
//! service's topic exchange with publisher confirms, and marks a row
//! published only after the broker confirmed it: a crash or a lost connection
//! at any point leaves the row to be published again (at-least-once; the
//! consumers' inbox makes a repeat harmless).
//!
//! # Ordering and several relays: partitioned claiming
//!
//! Rows are spread over [`PARTITIONS`] partitions by a stable hash of their
//! aggregate id, so all events of one aggregate share a partition. A relay
//! batch runs in one transaction whose first round trip (the SQL function
//! `outbox_claim`) takes `pg_try_advisory_xact_lock(namespace, partition)`
//! for every partition it can get, then reads the unpublished rows of those
//! partitions in `seq` order with a snapshot taken after the locks, publishes them in that order on one channel, waits for the
//! confirms, marks the confirmed rows and commits, which releases the locks.
//!
//! - Two relays never hold the same partition at once, so in normal operation
//!   each event is published once, and an aggregate's events leave in `seq`
//!   order. `seq` is commit order per aggregate because every command locks
//!   the aggregate's row before it inserts the event.
//! - Within a batch the rows go out in **waves**: a wave holds the next row
//!   of every aggregate that has one, is sent pipelined, and all its
//!   confirms are awaited before the next wave. So there is never more than
//!   one unconfirmed publish per aggregate, and a later event of an
//!   aggregate is sent only after the broker confirmed the earlier one was
//!   routed to every queue bound for it: a nack, a confirm timeout or a lost
//!   connection in the middle of a batch cannot let it overtake. An
//!   aggregate whose row failed stops there for the batch (its later rows
//!   stay unpublished and go out, in order, in a later batch); the others go
//!   on, and every confirmed row is marked. Batches of many aggregates cost
//!   nothing in throughput (one wave); one aggregate's backlog goes out one
//!   confirm at a time.
//! - A batch is bounded by time as well as rows: no wave starts after
//!   [`RelayConfig::batch_time`] (`RELAY_BATCH_TIME`, 2 s), the last wave's
//!   confirms are awaited together for at most `RELAY_CONFIRM_TIMEOUT`, and
//!   the batch marks what the broker confirmed and commits; the next batch
//!   starts at once with the rows left. So an aggregate with thousands of
//!   pending rows (thousands of confirm round trips) drains at the
//!   broker's confirm rate over several batches, instead of a batch
//!   outliving its transaction's deadline, rolling back after its events
//!   were confirmed, and publishing them again the next time, forever. The
//!   transaction's deadline is the statement timeout plus the batch time
//!   plus the confirm timeout, and the service refuses to start unless
//!   `DATABASE_IDLE_IN_TRANSACTION_TIMEOUT` exceeds the batch time plus the
//!   confirm timeout (the session is idle in its transaction while it
//!   publishes).
//! - Every publish is `mandatory` ([`Unroutable::Wait`], the default): an
//!   event no queue is bound to receive comes back from the broker, is not
//!   marked, and waits in the outbox (counted in
//!   `outbox_events_unroutable_total`, logged) until a consumer declares its
//!   queue; so a producer that starts on a fresh broker before its consumers
//!   loses nothing. Batches read the oldest rows first, so more than
//!   `RELAY_BATCH_SIZE` events no queue takes hold up the events behind them
//!   in their partitions: with `wait`, every routing key a producer uses
//!   needs a consumer. [`Unroutable::Drop`] is for an exchange nobody
//!   consumes (the order service's, by default).
//! - A relay that dies mid-batch loses its transaction, its locks and its
//!   marks: another relay (or the restarted one) publishes those rows again.
//!   That is the one case where an event is published twice.
//!
//! Advisory locks were chosen over `FOR UPDATE SKIP LOCKED` on rows (which
//! lets a second relay publish a later event of an aggregate while the first
//! still holds an earlier one) and over leases in a table (which need clocks,
//! renewal and fencing). Transaction-scoped locks disappear with the
//! transaction or the connection, so a crashed relay never blocks a partition.
//! Within one relay, [`RelayConfig::lanes`] splits the partitions between
//! lanes (lane `i` of `n` tries partitions `i`, `i + n`, …), each with its
//! own database transaction and broker channel, so one lane's database work
//! overlaps another's wait for publisher confirms. Across relays the same
//! locks apply lane by lane: a second relay takes over whatever partitions
//! the first does not hold at that moment, so extra relays add availability
//! first; throughput is bounded by the broker's confirmed-publish rate
//! long before the number of relays matters.
//!
//! # Signing
//!
//! Every event is signed with the producer's Ed25519 key as it is
//! published (headers `signature` and `signature_key_id`; what is signed and
//! why at publishing rather than when the row is written:
//! `shop_messaging::signing`). A [`Relay`] cannot be built without its
//! [`shop_messaging::signing::SigningKey`]; the service host reads it from
//! `EVENT_SIGNING_KEY_FILE` and `EVENT_SIGNING_KEY_ID` and refuses to start
//! a relay without them.
//!
//! # Tracing
//!
//! [`enqueue`] stores the W3C propagation fields of the current span (the
//! command's) with the row. The relay opens one producer span per row,
//! `<exchange> publish`, as a **child** of that stored context and injects its
//! own context into the AMQP headers, so the consumer's process span is in
//! turn its child and one client call is one trace. The messaging
//! conventions also allow a link instead of a parent; a child was chosen
//! because each row is published once, on behalf of exactly one command,
//! and the waiting time in the outbox then shows up in the trace as the gap
//! between the command and its publish. The span lasts until the broker's
//! confirm. Rows without a stored context (bulk loads) get no span.
//!
//! # Waking up
//!
//! There is no trigger on `outbox`: a `NOTIFY` at every command's commit
//! serialised the database's commits. A command calls
//! [`Wake::committed`] after its commit, which wakes the lane of this
//! process's relay that owns the event's partition, and the service host
//! runs [`Wake::announce`], which tells the relays of other processes (at
//! most one `NOTIFY outbox` per `OUTBOX_NOTIFY_INTERVAL`, naming the
//! partitions). The relay `LISTEN`s on a dedicated connection for those, and
//! looks every [`RelayConfig::poll_interval`] whatever it heard: an event
//! written by a process that announces nothing is published within the
//! poll interval (see [`Wake`]).
#![forbid(unsafe_code)]

mod relay;
pub mod schema;
mod wake;

pub use relay::{BatchOutcome, BrokerError, Relay, RelayConfig, RelayError, Unroutable};
pub use wake::Wake;

use diesel::{ExpressionMethods as _, QueryResult};
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use shop_contracts::Event;
use uuid::Uuid;

pub use shop_messaging::wire::{PARTITIONS, partition_of};

/// Writes `event` to the outbox on `conn`, which should be inside the
/// transaction that makes the change the event describes. The current span's
/// trace context is stored with it, so the publish continues the trace.
///
/// It takes a shared reference so a command can pipeline it with its own
/// statement (`futures::join!` of both futures sends both before waiting);
/// PostgreSQL still runs them in the order they were sent.
///
/// Returns the new event id (UUIDv7).
pub async fn enqueue<E: Event>(mut conn: &AsyncPgConnection, event: &E) -> QueryResult<Uuid> {
    use schema::outbox::dsl;

    let event_id = Uuid::now_v7();
    let trace = shop_telemetry::propagation::current_map();
    let trace = serde_json::to_value(trace).unwrap_or_default();
    diesel::insert_into(dsl::outbox)
        .values((
            dsl::event_id.eq(event_id),
            dsl::aggregate_type.eq(E::AGGREGATE_TYPE),
            dsl::aggregate_id.eq(event.aggregate_id()),
            dsl::aggregate_version.eq(event.aggregate_version()),
            dsl::partition_key.eq(partition_of(event.aggregate_id())),
            dsl::event_type.eq(E::TYPE_NAME),
            dsl::routing_key.eq(E::ROUTING_KEY),
            dsl::payload.eq(event.encode_to_vec()),
            dsl::trace_context.eq(trace),
        ))
        .execute(&mut conn)
        .await?;
    Ok(event_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_and_in_range() {
        // FNV-1a (32-bit) of this id modulo 32, worked out by hand.
        assert_eq!(partition_of("3f2504e0-4f89-41d3-9a0c-0305e82c3301"), 17);
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            let p = partition_of(&Uuid::from_u128(i * 7919).to_string());
            assert!((0..PARTITIONS).contains(&p));
            seen.insert(p);
        }
        assert_eq!(seen.len(), PARTITIONS as usize, "ids spread over every partition");
    }
}
