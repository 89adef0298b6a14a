//! `ResyncUsers`: republish the current state of selected users as
//! `UserSnapshot` events, so that a consumer that missed events can catch
//! up.
//!
//! A resync runs in its own task, batch after batch: each batch is one
//! short transaction ([`store::write_snapshots`]) over the next ids in id
//! order (keyset pagination, so the millionth user costs what the first
//! did), and is followed by one `ResyncUsersProgress` message. Batches are
//! paced so that no more than `max_per_second` snapshots are written per
//! second on average: live traffic keeps the database and the relay. The
//! task stops between batches once the caller is gone (cancelled, or its
//! deadline passed); what it wrote stays written, and a snapshot written
//! twice is harmless (a consumer takes it at or below its position as a
//! duplicate).
//!
//! Progress is logged after every batch (`resync progress`, with `written`
//! and `total`) and counted in `user_resync_snapshots_total`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use shop_contracts::user as pb;
use shop_database::Pool;
use shop_outbox::Wake;
use tokio::sync::mpsc;
use tonic::Status;
use uuid::Uuid;

use crate::error::Error;
use crate::store::{self, Selection};

/// The server's rate bound when `RESYNC_MAX_PER_SECOND` is not set.
pub const DEFAULT_MAX_PER_SECOND: u32 = 500;

/// Most snapshots in one batch (one transaction).
pub const MAX_BATCH: u32 = 200;

/// How long a progress message may wait for the caller to take it before
/// the resync gives up on the caller.
const SEND_DEADLINE: Duration = Duration::from_secs(30);

/// A validated `ResyncUsers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resync {
    /// Which users.
    pub selection: Selection,
    /// At most this many snapshots per second.
    pub max_per_second: u32,
}

impl Resync {
    /// Snapshots per batch: a fifth of a second's worth, so that progress
    /// comes several times a second and each transaction stays short.
    pub fn batch_size(&self) -> u32 {
        (self.max_per_second / 5).clamp(1, MAX_BATCH)
    }
}

/// What a resync streams: a progress message after each batch, or the
/// status it ended with.
pub type Progress = Result<pb::ResyncUsersProgress, Status>;

/// Runs `resync` over `pool`, sending a progress message to `progress`
/// after each batch, until every selected user's snapshot is written, a
/// batch fails (its status is sent last), or `progress` is closed.
pub async fn run(pool: Pool, wake: Wake, resync: Resync, progress: mpsc::Sender<Progress>) {
    if let Err(error) = drive(&pool, &wake, &resync, &progress).await {
        tracing::warn!(error = %error, "resync failed");
        let _ = send(&progress, Err(error.into())).await;
    }
}

/// Where the selection is: the known ids still to do, or a keyset cursor.
enum Cursor {
    Ids(std::vec::IntoIter<Uuid>),
    Changed {
        since: Option<DateTime<Utc>>,
        created_by: DateTime<Utc>,
        after: Option<Uuid>,
    },
}

impl Cursor {
    async fn next(&mut self, pool: &Pool, limit: u32) -> Result<Vec<Uuid>, Error> {
        match self {
            Self::Ids(ids) => Ok(ids.by_ref().take(limit as usize).collect()),
            Self::Changed {
                since,
                created_by,
                after,
            } => {
                let (since, created_by, from) = (*since, *created_by, *after);
                let ids = pool
                    .run(async |conn| {
                        store::changed_ids(conn, since, created_by, from, i64::from(limit)).await
                    })
                    .await?;
                if let Some(last) = ids.last() {
                    *after = Some(*last);
                }
                Ok(ids)
            }
        }
    }
}

async fn drive(
    pool: &Pool,
    wake: &Wake,
    resync: &Resync,
    progress: &mpsc::Sender<Progress>,
) -> Result<(), Error> {
    let started = tokio::time::Instant::now();
    let created_by = Utc::now();
    let (mut cursor, total, unknown_ids) = match &resync.selection {
        Selection::Ids(ids) => {
            let known = pool.run(async |conn| store::known(conn, ids).await).await?;
            let unknown: Vec<String> = ids
                .iter()
                .filter(|id| known.binary_search(id).is_err())
                .map(Uuid::to_string)
                .collect();
            let total = known.len() as i64;
            (Cursor::Ids(known.into_iter()), total, unknown)
        }
        Selection::ChangedSince(_) | Selection::All => {
            let since = match resync.selection {
                Selection::ChangedSince(since) => Some(since),
                _ => None,
            };
            let total = pool
                .run(async |conn| store::count_changed(conn, since, created_by).await)
                .await?;
            let cursor = Cursor::Changed {
                since,
                created_by,
                after: None,
            };
            (cursor, total, Vec::new())
        }
    };
    tracing::info!(total, max_per_second = resync.max_per_second, "resync started");
    let batch_size = resync.batch_size();
    let mut written: i64 = 0;
    let mut batch = cursor.next(pool, batch_size).await?;
    let mut unknown_ids = Some(unknown_ids);
    loop {
        if !batch.is_empty() {
            let ids = std::mem::take(&mut batch);
            let count = pool
                .run(async |conn| store::write_snapshots(conn, &ids).await)
                .await?;
            // Committed: the relays publish the batch at once.
            for id in &ids {
                wake.committed(&id.to_string());
            }
            metrics::counter!("user_resync_snapshots_total").increment(count);
            written += count as i64;
            batch = cursor.next(pool, batch_size).await?;
        }
        let last = batch.is_empty();
        tracing::info!(written, total, "resync progress");
        let message = pb::ResyncUsersProgress {
            written,
            total,
            unknown_ids: if last {
                unknown_ids.take().unwrap_or_default()
            } else {
                Vec::new()
            },
        };
        if !send(progress, Ok(message)).await {
            tracing::info!(written, total, "resync stopped: the caller is gone");
            return Ok(());
        }
        if last {
            break;
        }
        // Paced to the rate: the next batch starts once the ones before it
        // are within `max_per_second`, or never if the caller left.
        let due = started + Duration::from_secs_f64(written as f64 / f64::from(resync.max_per_second));
        tokio::select! {
            () = tokio::time::sleep_until(due) => {}
            () = progress.closed() => {
                tracing::info!(written, total, "resync stopped: the caller is gone");
                return Ok(());
            }
        }
    }
    tracing::info!(written, total, "resync done");
    Ok(())
}

/// Sends `item` unless the caller is gone or does not take it within
/// [`SEND_DEADLINE`]; whether it was sent.
async fn send(progress: &mpsc::Sender<Progress>, item: Progress) -> bool {
    matches!(
        tokio::time::timeout(SEND_DEADLINE, progress.send(item)).await,
        Ok(Ok(()))
    )
}
