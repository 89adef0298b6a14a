//! Keeping tables that grow with traffic bounded: the outbox's published
//! rows, the inbox's applied event ids, the request ids of idempotent
//! commands.
//!
//! A [`Retention`] names a table, its timestamp column and a window;
//! [`Retention::sweep`] deletes the rows older than the window in batches
//! (each its own short statement, within the pool's deadline, so a large
//! backlog never holds locks or a transaction for long) and loops until none
//! is left, however many there are. [`sweep_forever`] runs the sweeps of a
//! service at start-up and then every interval: a service that restarts
//! often still sweeps, since every start sweeps once. Sweeping from several
//! instances at once is harmless (they delete disjoint or already-deleted
//! rows).
//!
//! Each table's timestamp column needs an index for the sweep to stay cheap
//! (the migrations create them).

use std::time::Duration;

use diesel::sql_types::{BigInt, Text, Timestamptz};
use diesel_async::RunQueryDsl as _;
use tokio_util::sync::CancellationToken;

use crate::{Pool, RunError};

/// Rows deleted by one statement of a sweep.
pub const BATCH: i64 = 5000;

/// Rows of `table` whose `column` is older than `window` are deleted.
#[derive(Debug, Clone)]
pub struct Retention {
    /// The table (a plain identifier: it is written into the statement).
    pub table: &'static str,
    /// Its timestamp column (`published_at`, `processed_at`, `created_at`).
    pub column: &'static str,
    /// How long rows are kept.
    pub window: Duration,
    /// Only rows whose `consumer` column is this (the inbox of one
    /// consumer), when set.
    pub consumer: Option<String>,
}

impl Retention {
    /// Deletes every row older than the window, `BATCH` at a time; returns
    /// how many.
    pub async fn sweep(&self, pool: &Pool) -> Result<usize, RunError> {
        let cutoff =
            chrono::Utc::now() - chrono::Duration::from_std(self.window).unwrap_or(chrono::Duration::MAX);
        let filter = if self.consumer.is_some() {
            "AND consumer = $3"
        } else {
            ""
        };
        // ctid: delete exactly the rows the inner query picked, whatever the
        // table's key.
        let statement = format!(
            "DELETE FROM {table} WHERE ctid = ANY(ARRAY(\
             SELECT ctid FROM {table} WHERE {column} < $1 {filter} LIMIT $2))",
            table = self.table,
            column = self.column,
        );
        let mut total = 0;
        loop {
            let deleted = pool
                .run(async |conn| {
                    let query = diesel::sql_query(&statement)
                        .bind::<Timestamptz, _>(cutoff)
                        .bind::<BigInt, _>(BATCH);
                    let result = match &self.consumer {
                        Some(consumer) => query.bind::<Text, _>(consumer).execute(conn).await,
                        None => query.execute(conn).await,
                    };
                    result.map_err(RunError::from)
                })
                .await?;
            total += deleted;
            if (deleted as i64) < BATCH {
                if total > 0 {
                    metrics::counter!("retention_deleted_total", "table" => self.table)
                        .increment(total as u64);
                }
                return Ok(total);
            }
        }
    }
}

/// Sweeps every table of `retentions` now and then every `interval`, until
/// `shutdown`. A failed sweep is logged and tried again at the next round.
pub async fn sweep_forever(
    pool: Pool,
    retentions: Vec<Retention>,
    interval: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Exported from the start at zero, before anything is past its window.
    for retention in &retentions {
        metrics::counter!("retention_deleted_total", "table" => retention.table).increment(0);
    }
    loop {
        for retention in &retentions {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            match retention.sweep(&pool).await {
                Ok(0) => {}
                Ok(deleted) => {
                    tracing::info!(table = retention.table, deleted, "deleted rows past retention")
                }
                Err(error) => tracing::warn!(
                    table = retention.table,
                    error = %error_chain(&error),
                    "retention sweep failed; tried again at the next round"
                ),
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(interval) => {}
        }
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|layer| layer as _)
        }
    }

    #[test]
    fn a_failed_sweep_is_logged_with_every_cause() {
        let error = Layer(
            "sweep of outbox",
            Some(Box::new(Layer(
                "connection reset",
                Some(Box::new(Layer("broken pipe", None))),
            ))),
        );
        assert_eq!(
            error_chain(&error),
            "sweep of outbox: connection reset: broken pipe"
        );
    }
}
