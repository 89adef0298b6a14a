//! Waking relays when events are committed, without a trigger on the
//! outbox.
//!
//! A `NOTIFY` sent at every command's commit serialises the commits of the
//! whole database through one lock (a notifying transaction holds it from
//! its commit record until its notifications are queued, so its commit
//! shares no WAL flush): with the outbox's `NOTIFY` trigger the command
//! transaction's commit ceiling was 55 % of the same transaction's without.
//! So a command wakes relays in two ways instead, neither inside its
//! transaction:
//!
//! - **in process**: after its commit it calls [`Wake::committed`], which
//!   wakes the lanes of this process's relay that own the event's partition
//!   (a counter per partition, in memory);
//! - **other processes**: a background task ([`Wake::announce`]) sends at
//!   most one `NOTIFY outbox` per `OUTBOX_NOTIFY_INTERVAL` (10 ms), and only
//!   after commits happened here, carrying this process's mark and the
//!   partitions committed since the last one. Every relay `LISTEN`s, wakes
//!   the lanes that own one of those partitions and ignores its own
//!   process's announcements (its lanes were woken already).
//!
//! A relay also looks every `RELAY_POLL_INTERVAL` (1 s) whatever it heard,
//! so a lost wake-up (a dropped `LISTEN` session, an announcement that
//! failed) costs at most that long. A process that writes to the outbox
//! without this crate (a migration, a bulk load, another language) sends
//! `NOTIFY outbox` after its commit to have its events published at once
//! (an empty payload wakes every lane); without it they are published
//! within the poll interval.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use shop_database::Pool;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::{PARTITIONS, partition_of};

/// How many times each partition was woken, by partition.
pub(crate) type Counts = [u64; PARTITIONS as usize];

/// Every partition, as a mask of one bit per partition.
const EVERY_PARTITION: u32 = u32::MAX >> (32 - PARTITIONS as u32);

/// Wakes relays when a command committed events; see the module docs.
/// Clones share one state: the service host makes one per process and hands
/// it to the commands and to the relay.
#[derive(Clone)]
pub struct Wake {
    inner: Arc<Inner>,
}

struct Inner {
    /// How many times each partition was woken; the relay's lanes wait for
    /// a change in a partition they own.
    counts: watch::Sender<Counts>,
    /// Partitions committed here since the last announcement, a bit each.
    unannounced: AtomicU32,
    /// Wakes the announcing task.
    announce: Notify,
    /// This process's mark on its announcements (random), so its own
    /// relay ignores them.
    mark: u64,
}

impl std::fmt::Debug for Wake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wake")
            .field("mark", &self.inner.mark)
            .finish_non_exhaustive()
    }
}

impl Default for Wake {
    fn default() -> Self {
        Self::new()
    }
}

impl Wake {
    /// A wake of its own (one per process; clones share it).
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                counts: watch::Sender::new([0; PARTITIONS as usize]),
                unannounced: AtomicU32::new(0),
                announce: Notify::new(),
                mark: uuid::Uuid::new_v4().as_u64_pair().0,
            }),
        }
    }

    /// To be called by a command **after** its transaction committed an
    /// event of `aggregate_id`: wakes this process's relay lane that owns
    /// the event's partition and has the next announcement name it. Called
    /// before the commit, a lane could read the outbox before the row is
    /// visible and then wait for the poll.
    pub fn committed(&self, aggregate_id: &str) {
        let bit = 1_u32 << partition_of(aggregate_id);
        self.wake(bit);
        self.inner.unannounced.fetch_or(bit, Ordering::AcqRel);
        self.inner.announce.notify_one();
    }

    /// Wakes the lanes of this process that own a partition of `mask`.
    pub(crate) fn wake(&self, mask: u32) {
        self.inner.counts.send_modify(|counts| {
            for (partition, count) in counts.iter_mut().enumerate() {
                if mask & (1 << partition) != 0 {
                    *count = count.wrapping_add(1);
                }
            }
        });
    }

    /// Wakes every lane of this process.
    pub(crate) fn wake_all(&self) {
        self.wake(EVERY_PARTITION);
    }

    /// What a relay's lane waits on.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Counts> {
        self.inner.counts.subscribe()
    }

    /// A `NOTIFY outbox` payload heard by this process's relay: wakes the
    /// lanes of the partitions it names, unless this process sent it. A
    /// payload in no known form (an external writer's, an empty one) wakes
    /// every lane.
    pub(crate) fn heard(&self, payload: &str) {
        match parse(payload) {
            Some((mark, _)) if mark == self.inner.mark => {}
            Some((_, mask)) => self.wake(mask),
            None => self.wake_all(),
        }
    }

    /// The payload of an announcement of `mask`.
    fn payload(&self, mask: u32) -> String {
        format!("{:x}:{mask:x}", self.inner.mark)
    }

    /// Runs until `shutdown`: after commits happened here, sends one
    /// `NOTIFY outbox` naming their partitions, then waits `interval` before
    /// the next (commits meanwhile are named together in it). A failed
    /// announcement is not repeated: the relays' poll finds those events.
    pub async fn announce(
        self,
        pool: Pool,
        interval: Duration,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        use diesel_async::RunQueryDsl as _;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = self.inner.announce.notified() => {}
            }
            let mask = self.inner.unannounced.swap(0, Ordering::AcqRel);
            if mask != 0 {
                let payload = self.payload(mask);
                let outcome = pool
                    .run(async |conn| {
                        shop_database::prepared(
                            diesel::sql_query("SELECT pg_notify('outbox', $1)")
                                .bind::<diesel::sql_types::Text, _>(&payload),
                        )
                        .execute(conn)
                        .await
                        .map_err(crate::RelayError::from)
                    })
                    .await;
                if let Err(error) = outcome {
                    tracing::debug!(error = %shop_telemetry::error_chain(&error), "outbox announcement failed; relays elsewhere find the events at their next poll");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

/// The mark and the partitions of an announcement.
fn parse(payload: &str) -> Option<(u64, u32)> {
    let (mark, mask) = payload.split_once(':')?;
    let mark = u64::from_str_radix(mark, 16).ok()?;
    let mask = u32::from_str_radix(mask, 16).ok()?;
    Some((mark, mask & EVERY_PARTITION))
}

/// The partitions lane `lane` of `lanes` owns, as a mask.
pub(crate) fn lane_mask((lane, lanes): (usize, usize)) -> u32 {
    (lane..PARTITIONS as usize)
        .step_by(lanes.max(1))
        .fold(0, |mask, partition| mask | (1 << partition))
}

/// Whether a partition of `mask` was woken between `seen` and `now`.
pub(crate) fn woken(mask: u32, seen: &Counts, now: &Counts) -> bool {
    (0..PARTITIONS as usize)
        .any(|partition| mask & (1 << partition) != 0 && seen[partition] != now[partition])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lane_is_woken_only_for_the_partitions_it_owns() {
        let wake = Wake::new();
        let lanes = [(0, 2), (1, 2)];
        let masks = lanes.map(lane_mask);
        assert_eq!(masks[0] | masks[1], EVERY_PARTITION);
        assert_eq!(masks[0] & masks[1], 0);
        let seen = *wake.subscribe().borrow();
        let id = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"; // partition 17
        wake.committed(id);
        let now = *wake.subscribe().borrow();
        assert!(!woken(masks[0], &seen, &now), "lane 0 owns the even partitions");
        assert!(woken(masks[1], &seen, &now), "lane 1 owns 17");
    }

    #[test]
    fn a_process_ignores_its_own_announcements_and_heeds_others_and_bare_ones() {
        let (here, there) = (Wake::new(), Wake::new());
        let mask = 1 << 3;
        let payload = here.payload(mask);
        let before = *here.subscribe().borrow();
        here.heard(&payload);
        assert_eq!(*here.subscribe().borrow(), before, "its own announcement");

        let before = *there.subscribe().borrow();
        there.heard(&payload);
        let after = *there.subscribe().borrow();
        assert!(woken(mask, &before, &after));
        assert!(!woken(!mask, &before, &after), "only partition 3");

        there.heard("");
        let bare = *there.subscribe().borrow();
        assert!(woken(EVERY_PARTITION, &after, &bare));
        assert!(
            (0..PARTITIONS as usize).all(|p| bare[p] != after[p]),
            "every partition"
        );
    }

    #[test]
    fn commits_between_announcements_are_named_together() {
        let wake = Wake::new();
        wake.committed("a");
        wake.committed("b");
        let mask = wake.inner.unannounced.load(Ordering::Acquire);
        assert_eq!(mask, (1 << partition_of("a")) | (1 << partition_of("b")));
        assert_eq!(parse(&wake.payload(mask)), Some((wake.inner.mark, mask)));
    }
}
