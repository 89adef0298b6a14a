//! The consumer's own poison rule for a message that kills the process:
//! a count of the handlings a crash ended, kept in the consumer's database
//! where no crash resets it.
//!
//! A handler that fails is retried through the delay queues and counted in
//! the `attempt` header; a handler that takes the process down (an abort,
//! the kernel's OOM killer, a stack overflow) never gets to write that
//! header: the broker only sees its messages come back. The broker's own
//! delivery limit is no rule for that, because every return counts towards
//! it (a hand-over, a self-fencing replica, a restart all return the whole
//! prefetch), so partition queues carry a limit no message reaches
//! ([`crate::topology`]). This count is the rule instead:
//!
//! - a delivery the broker marks `redelivered` is handled alone, and the
//!   row of its event in `inbox_crashes` is incremented in a short
//!   committed statement right before its transaction ([`start`]): nothing
//!   on a first delivery, one statement on a redelivery;
//! - a handling that ends with an outcome (applied, a duplicate, parked,
//!   retried, dead-lettered) deletes the row ([`forget`]); one held for a
//!   database outage gives its count back ([`give_back`]): an outage is
//!   not the message's fault;
//! - a handling that starts with more than the consumer's attempt limit
//!   (`CONSUMER_MAX_ATTEMPTS`) already counted is not started: the event
//!   is dead-lettered as `crashed`, and its aggregate's later events park
//!   behind it like behind any sequenced dead letter (`shop dlq replay` /
//!   `skip`).
//!
//! A message merely returned from the prefetch (never handed to a handler)
//! is not counted when it comes back: the count is taken when a handling
//! starts, and only the next start after a handling that never ended finds
//! the row left. Rows a crash left for events that never came back are
//! deleted by the retention sweep (`INBOX_RETENTION`, on `counted_at`).

use diesel::sql_types::{Integer, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use uuid::Uuid;

/// A count returned by [`start`].
#[derive(diesel::QueryableByName)]
struct Handlings {
    #[diesel(sql_type = Integer)]
    handlings: i32,
}

/// Counts the start of a handling of redelivered event `event_id` and
/// returns how many handlings of it have started without an outcome,
/// this one included.
pub(super) async fn start(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    event_id: Uuid,
) -> diesel::QueryResult<u32> {
    let counted: Handlings = diesel::sql_query(
        "INSERT INTO inbox_crashes (consumer, event_id, handlings) VALUES ($1, $2, 1) \
         ON CONFLICT (consumer, event_id) DO UPDATE \
         SET handlings = inbox_crashes.handlings + 1, counted_at = now() \
         RETURNING handlings",
    )
    .bind::<Text, _>(consumer)
    .bind::<diesel::sql_types::Uuid, _>(event_id)
    .get_result(conn)
    .await?;
    Ok(u32::try_from(counted.handlings).unwrap_or(0))
}

/// Takes back the handling [`start`] counted: it was held for an outage.
pub(super) async fn give_back(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    event_id: Uuid,
) -> diesel::QueryResult<()> {
    diesel::sql_query(
        "UPDATE inbox_crashes SET handlings = handlings - 1 \
         WHERE consumer = $1 AND event_id = $2 AND handlings > 0",
    )
    .bind::<Text, _>(consumer)
    .bind::<diesel::sql_types::Uuid, _>(event_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Forgets the count of `event_id`: its handling ended with an outcome.
pub(super) async fn forget(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    event_id: Uuid,
) -> diesel::QueryResult<()> {
    diesel::sql_query("DELETE FROM inbox_crashes WHERE consumer = $1 AND event_id = $2")
        .bind::<Text, _>(consumer)
        .bind::<diesel::sql_types::Uuid, _>(event_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The dead-letter error text of an event whose handlings a crash ended
/// `times` times.
pub(super) fn reason(times: u32) -> String {
    format!(
        "crashed the consumer {times} times: the process ended while handling it (an abort, a kill, \
         running out of memory), so it is set aside instead of being handled again"
    )
}
