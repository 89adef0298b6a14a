//! Which replica of a consumer group consumes which partition queue.
//!
//! Every replica of a consumer writes a heartbeat to `consumer_members`
//! (its own member id, time-ordered, `seen_at = now()` of the database) every
//! fifth of [`ConsumerConfig::member_timeout`](crate::consumer::ConsumerConfig::member_timeout),
//! and reads the members seen within the timeout. Sorted by id, member `i`
//! of `m` owns partition queues `i`, `i + m`, `i + 2m`, …: each replica
//! computes the same split from the same rows, and only the database's clock
//! is used. Ids sort in the order replicas started ([`new_member`]), so a
//! replica that joins takes only partitions the even split needs to move.
//!
//! A replica consumes only the partitions it owns. When the split changes
//! (a replica joined, left, or stopped beating), the replica that loses a
//! partition finishes the batch under way, acknowledges it and closes the
//! partition's channel, which hands what it had prefetched back to the
//! queue; the replica that gains it registers a consumer, which the queue's
//! single-active-consumer setting keeps waiting until the previous one is
//! gone. So at any moment at most one consumer takes from a partition, and
//! nothing is lost in a hand-over: the worst case (the previous owner froze
//! and its connection has not timed out yet) is a wait, not a second
//! consumer.
//!
//! A replica that stops cleanly deletes its row at once; one that dies
//! stops beating, and its partitions move after `member_timeout`. One whose
//! heartbeats fail for `member_timeout` (its database unreachable, for it
//! alone perhaps) gives up its partitions itself, as the others take them,
//! and takes its share again at its first heartbeat that succeeds (the
//! consumer's session does this: self-fencing). Rows not seen for ten
//! timeouts are deleted.
//!
//! Why a table rather than the broker: RabbitMQ 3.x activates the first
//! consumer that registers on a single-active-consumer queue, so replicas
//! that all register everywhere would leave one replica doing all the work;
//! the consumer's own database is already there, and a lease in it needs
//! no clock but the database's.
//!
//! ```sql
//! CREATE TABLE consumer_members (consumer TEXT, member UUID,
//!     seen_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (consumer, member));
//! ```

use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{Double, Text};
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use uuid::Uuid;

#[derive(QueryableByName)]
struct Member {
    #[diesel(sql_type = diesel::sql_types::Uuid)]
    member: Uuid,
}

/// Records `member`'s heartbeat for `consumer` and returns the members seen
/// within `timeout`, sorted, `member` included.
pub async fn beat(
    conn: &mut AsyncPgConnection,
    consumer: &str,
    member: Uuid,
    timeout: Duration,
) -> diesel::QueryResult<Vec<Uuid>> {
    diesel::sql_query(
        "INSERT INTO consumer_members (consumer, member) VALUES ($1, $2) \
         ON CONFLICT (consumer, member) DO UPDATE SET seen_at = now()",
    )
    .bind::<Text, _>(consumer)
    .bind::<diesel::sql_types::Uuid, _>(member)
    .execute(conn)
    .await?;
    diesel::sql_query(
        "DELETE FROM consumer_members WHERE consumer = $1 AND seen_at < now() - make_interval(secs => $2 * 10)",
    )
    .bind::<Text, _>(consumer)
    .bind::<Double, _>(timeout.as_secs_f64())
    .execute(conn)
    .await?;
    let rows: Vec<Member> = diesel::sql_query(
        "SELECT member FROM consumer_members \
         WHERE consumer = $1 AND seen_at >= now() - make_interval(secs => $2) ORDER BY member",
    )
    .bind::<Text, _>(consumer)
    .bind::<Double, _>(timeout.as_secs_f64())
    .load(conn)
    .await?;
    let mut members: Vec<Uuid> = rows.into_iter().map(|row| row.member).collect();
    if !members.contains(&member) {
        members.push(member);
        members.sort();
    }
    Ok(members)
}

/// Deletes `member`'s row: the others take its partitions at their next
/// heartbeat.
pub async fn leave(conn: &mut AsyncPgConnection, consumer: &str, member: Uuid) -> diesel::QueryResult<()> {
    diesel::sql_query("DELETE FROM consumer_members WHERE consumer = $1 AND member = $2")
        .bind::<Text, _>(consumer)
        .bind::<diesel::sql_types::Uuid, _>(member)
        .execute(conn)
        .await?;
    Ok(())
}

/// A new replica's member id: time-ordered (UUIDv7), so that members sort
/// in the order they joined and one that joins sorts last. With `m` members
/// before it, partitions `0..m` keep their owners, and with no more
/// partitions than members nothing moves at all: no hand-over, and the
/// positions each replica remembers stay useful. Random ids moved a
/// partition to the newcomer whenever its id sorted first: in the ordered
/// drain of the benchmark with one partition and two instances, a hand-over
/// in half the rounds, after which every aggregate's position was read
/// again.
pub fn new_member() -> Uuid {
    Uuid::now_v7()
}

/// The partitions (of `partitions`) that `member` owns among `members`
/// (sorted): member `i` of `m` owns `i`, `i + m`, …
pub fn owned(members: &[Uuid], member: Uuid, partitions: u16) -> Vec<u16> {
    let Some(index) = members.iter().position(|m| *m == member) else {
        return Vec::new();
    };
    let count = members.len();
    (0..partitions)
        .filter(|partition| usize::from(*partition) % count == index)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_has_exactly_one_owner_and_the_split_is_even() {
        for members in 1..=6_usize {
            let ids: Vec<Uuid> = {
                let mut ids: Vec<Uuid> = (0..members).map(|_| Uuid::new_v4()).collect();
                ids.sort();
                ids
            };
            for partitions in 1..=32_u16 {
                let mut owners = vec![0; usize::from(partitions)];
                let mut sizes = Vec::new();
                for id in &ids {
                    let mine = owned(&ids, *id, partitions);
                    sizes.push(mine.len());
                    for partition in mine {
                        owners[usize::from(partition)] += 1;
                    }
                }
                assert!(
                    owners.iter().all(|n| *n == 1),
                    "{members} members, {partitions} partitions"
                );
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "uneven split {sizes:?}");
            }
        }
    }

    #[test]
    fn a_replica_that_joins_takes_no_partition_the_split_does_not_need_to_move() {
        for before in 1..=6_usize {
            let mut members: Vec<Uuid> = (0..before).map(|_| new_member()).collect();
            members.sort();
            let joined = new_member();
            let mut after = members.clone();
            after.push(joined);
            after.sort();
            for partitions in 1..=32_u16 {
                for (index, member) in members.iter().enumerate() {
                    let kept = owned(&after, *member, partitions);
                    // Member i keeps partition i (if there is one): one of
                    // the first `before` partitions never moves.
                    if usize::from(partitions) > index {
                        assert!(
                            kept.contains(&(index as u16)),
                            "{before} members + 1, {partitions} partitions: member {index} lost its first"
                        );
                    }
                    if usize::from(partitions) <= before {
                        assert_eq!(
                            kept,
                            owned(&members, *member, partitions),
                            "{before} members + 1, {partitions} partitions: nothing had to move"
                        );
                    }
                }
                assert!(
                    usize::from(partitions) > before || owned(&after, joined, partitions).is_empty(),
                    "the replica that joined took a partition from {before} members over {partitions}"
                );
            }
        }
    }

    #[test]
    fn a_member_not_in_the_list_owns_nothing() {
        assert!(owned(&[Uuid::new_v4()], Uuid::new_v4(), 4).is_empty());
    }
}
